"""Settings the renderers take as arguments (the operator reads them from its flags/env; tests pass their own)."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiaas import __version__

DEFAULT_IMAGE = f"localhost/aiaas-trainer:{__version__}"


@dataclass(frozen=True)
class RenderSettings:
    trainer_image: str = DEFAULT_IMAGE
    server_image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    run_as_user: int = 1000
    termination_grace_seconds: int = 60
    service_account_name: str | None = None
    # A NetworkPolicy per TrainingJob: only its own pods reach its pods (rendezvous, master, process-group
    # ports); the metrics ports also from the operator's namespace and the monitoring namespaces. And each
    # namespace's isolation policy, which closes every TrainingJob pod until its job's policy admits.
    network_policy: bool = True
    operator_namespace: str = ""  # "": the metrics ports are not opened to the operator's namespace
    monitoring_namespace_selector: dict[str, str] = field(default_factory=dict)  # labels; {}: no monitoring
