"""Helpers for the tests of the Helm chart, the kustomize manifests and the monitoring files.

Importable as ``deploy_util`` from tests/deploy (pytest puts the directory on sys.path) and from tests/e2e
(those tests add tests/deploy to sys.path themselves).
"""

from __future__ import annotations

import copy
import re
import shutil
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "aiaas"
DEPLOY = REPO / "deploy"
HERE = Path(__file__).resolve().parent
MONITORING_CRDS = HERE / "crds"  # monitoring.coreos.com CRDs of prometheus-operator v0.85.0 (Apache-2.0)
K8S_VERSION = "1.36.0"
RELEASE = "aiaas-operator"
NAMESPACE = "aiaas-system"
# Chart values that turn on every monitoring object: the helm twin of deploy/monitoring.
MONITORING_VALUES = {
    "serviceMonitor": {"enabled": True},
    "podMonitor": {"trainer": True, "server": True},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
}


def _bin_dir() -> Path | None:
    proc = subprocess.run([str(REPO / "hack" / "cluster.sh"), "bin-dir"], capture_output=True, text=True)
    return Path(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None


def tool(name: str) -> str | None:
    """``helm``/``kubectl``: from PATH, else the binaries hack/cluster.sh builds."""
    found = shutil.which(name)
    if found:
        return found
    d = _bin_dir()
    if d is not None and (d / name).is_file():
        return str(d / name)
    return None


def run(cmd: list[str], *, check: bool = True, timeout: float = 120, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def write_values(tmp: Path, values: dict[str, Any], name: str = "values.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(values))
    return path


def helm_template(helm: str, *args: str, values: dict[str, Any] | None = None, tmp: Path | None = None,
                  release: str = RELEASE, namespace: str = NAMESPACE, crds: bool = True) -> list[dict[str, Any]]:
    cmd = [helm, "template", release, str(CHART), "--namespace", namespace, "--kube-version", K8S_VERSION]
    if crds:
        cmd.append("--include-crds")
    if values:
        assert tmp is not None
        cmd += ["--values", str(write_values(tmp, values))]
    return docs(run([*cmd, *args]).stdout)


def kustomize(kubectl: str, directory: str) -> list[dict[str, Any]]:
    return docs(run([kubectl, "kustomize", str(DEPLOY / directory)]).stdout)


def key(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


def is_helm_hook(obj: dict[str, Any]) -> bool:
    return "helm.sh/hook" in ((obj.get("metadata") or {}).get("annotations") or {})


HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


def _strip_labels(meta: dict[str, Any] | None) -> None:
    if not meta or "labels" not in meta:
        return
    for label in HELM_ONLY_LABELS:
        # the operator's own children are managed-by aiaas-operator; only Helm's bookkeeping label goes
        if label == "app.kubernetes.io/managed-by" and meta["labels"].get(label) != "Helm":
            continue
        meta["labels"].pop(label, None)
    if not meta["labels"]:
        del meta["labels"]


def normalise(objs: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """Objects by key, without Helm's bookkeeping labels and its test hooks, for comparison with kustomize."""
    out = {}
    for obj in objs:
        if is_helm_hook(obj):
            continue
        obj = copy.deepcopy(obj)
        _strip_labels(obj.get("metadata"))
        template = ((obj.get("spec") or {}).get("template") or {})
        _strip_labels(template.get("metadata"))
        out[key(obj)] = obj
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------- CRD-kind validation
def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path in sorted(MONITORING_CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    for path in sorted((REPO / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


_SCHEMAS: dict[tuple[str, str], dict[str, Any]] | None = None


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the structural schema does not declare (what the API server's strict field validation rejects)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in obj.items():
            if props is not None and k in props:
                out += unknown_fields(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                out += unknown_fields(v, extra, f"{path}.{k}")
            elif props is not None and path == "" and k in ("apiVersion", "kind", "metadata"):
                continue
            elif props is not None:
                out.append(f"{path}.{k}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(obj):
            out += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


def validate_custom(obj: dict[str, Any]) -> None:
    """Validate an object of a CRD kind against the CRD's openAPIV3Schema, strictly (no unknown fields)."""
    global _SCHEMAS
    if _SCHEMAS is None:
        _SCHEMAS = _crd_schemas()
    schema = _SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if schema is None:
        raise AssertionError(f"no schema for {obj['apiVersion']} {obj['kind']}")
    # CRD schemas are OpenAPI v3 (close to draft 7); no check_schema: they hold Go regexes Python rejects
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: " + "; ".join(
        f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    unknown = unknown_fields(obj, schema)
    assert not unknown, f"{obj['kind']}/{obj['metadata']['name']}: unknown fields {unknown}"


def validate(obj: dict[str, Any]) -> None:
    """Strict validation: kubernetes-validate for built-in kinds, the CRD's schema for custom kinds."""
    import kubernetes_validate

    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    if group.endswith("monitoring.coreos.com") or group == "aiaas.dev":
        validate_custom(obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# ------------------------------------------------------------------------------------------ metrics
METRIC_NAME = re.compile(r"\baiaas_[a-z0-9_]+\b")


# ------------------------------------------------------------------------------------- e2e helpers
def wait_until(predicate: Any, *, timeout: float, what: str, interval: float = 0.3) -> Any:
    """Poll until ``predicate()`` is truthy; raise TimeoutError naming ``what`` (and the last error)."""
    import time

    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except Exception as err:  # noqa: BLE001 - polling
            last = err
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def service_account_kubeconfig(admin_kubeconfig: str, token: str, path: Path) -> Path:
    """A kubeconfig for the same API server that authenticates with ``token`` (a ServiceAccount's)."""
    cfg = yaml.safe_load(Path(admin_kubeconfig).read_text())
    ctx_name = cfg.get("current-context") or cfg["contexts"][0]["name"]
    ctx = next(c for c in cfg["contexts"] if c["name"] == ctx_name)["context"]
    cluster = next(c for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": cluster["name"], "user": "sa"}}],
        "current-context": "sa",
    }))
    path.chmod(0o600)
    return path


def http_get(url: str, timeout: float = 3) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


class Process:
    """A child process with its output in a log file; ``stop()`` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.cmd, self.log_path = cmd, log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - open for the child's lifetime
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd or REPO)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    def log(self, tail: int = 8000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""
