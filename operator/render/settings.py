"""Settings the renderers take as arguments (the operator reads them from its flags/env; tests pass their own)."""

from __future__ import annotations

from dataclasses import dataclass

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
