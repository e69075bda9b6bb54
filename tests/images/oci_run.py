"""Run aiaas's images as real containers with runc, the OCI runtime a kubelet uses underneath.

An image archive (from ``hack/images.sh``) becomes a buildah working container whose mounted filesystem is
the rootfs of a runc bundle. The bundle's config is ``runc spec``'s default, changed the way a kubelet would
for the pod template: the container's user, command and env; a read-only root filesystem; tmpfs for ``/tmp``
and ``/dev/shm``; bind mounts for the pod's volumes, its termination log and ``/etc/hosts``; no capabilities.
It shares the host's network namespace, or has one of its own with only loopback (a pod's, without a pod
network: the real-node tests have one).

(A module with its own name, not ``conftest``, so test modules import it unambiguously.)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiaas.operator.local import expand_vars


def sh(*argv: str, timeout: float = 600) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout).stdout.strip()


@dataclass
class Image:
    """An image archive unpacked into a buildah working container (one per test session)."""

    name: str
    archive: Path
    container: str = ""
    rootfs: Path = Path()
    config: dict[str, Any] = field(default_factory=dict)

    def open(self) -> Image:
        self.container = sh("buildah", "from", "--pull-never", "--quiet", f"docker-archive:{self.archive}")
        self.rootfs = Path(sh("buildah", "mount", self.container))
        inspect = json.loads(sh("buildah", "inspect", "--type", "container", self.container))
        self.config = inspect["OCIv1"]["config"]
        return self

    def close(self) -> None:
        if self.container:
            subprocess.run(["buildah", "rm", self.container], capture_output=True, check=False)

    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.config.get("Env", []))


@dataclass
class Mount:
    destination: str
    source: str = ""  # empty: a tmpfs
    read_only: bool = False

    def spec(self) -> dict[str, Any]:
        if not self.source:
            return {"destination": self.destination, "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "nodev", "mode=1777", "size=1g"]}
        return {"destination": self.destination, "type": "bind", "source": self.source,
                "options": ["rbind", "ro" if self.read_only else "rw"]}


def container_process(container: dict[str, Any], pod_name: str, namespace: str = "default") -> tuple[list[str], dict[str, str]]:
    """argv and env of a rendered container as a kubelet would start it (literal and downward-API env)."""
    ordinal = pod_name.rsplit("-", 1)[-1]
    fields = {"metadata.name": pod_name, "metadata.namespace": namespace,
              "metadata.labels['apps.kubernetes.io/pod-index']": ordinal}
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand_vars(str(item["value"]), env)
        else:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    argv = [expand_vars(a, env) for a in container.get("command", []) + container.get("args", [])]
    return argv, env


def run_in(image: Image, argv: list[str], workdir: Path, *, user: tuple[int, int], env: dict[str, str] | None = None,
           mounts: list[Mount] = (), hosts: dict[str, str] | None = None, private_network: bool = False,
           hostname: str = "container", detach: bool = False, timeout: float = 900) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    """Run argv in the image with runc: foreground (returns the finished process) or detached (a Popen)."""
    bundle = workdir / f"bundle-{uuid.uuid4().hex[:8]}"
    bundle.mkdir(parents=True)
    sh("runc", "spec", "--bundle", str(bundle))
    spec = json.loads((bundle / "config.json").read_text())
    hosts_file = bundle / "hosts"
    # like the kubelet's /etc/hosts: localhost, the pod's own hostname, and what the test adds
    entries = {"localhost": "127.0.0.1", hostname: "127.0.0.1", **(hosts or {})}
    hosts_file.write_text("".join(f"{ip} {name}\n" for name, ip in entries.items()))
    spec["hostname"] = hostname
    spec["root"] = {"path": str(image.rootfs), "readonly": True}
    process = spec["process"]
    process.update(terminal=False, args=argv, cwd=image.config.get("WorkingDir") or "/",
                   user={"uid": user[0], "gid": user[1]}, noNewPrivileges=True,
                   env=[f"{k}={v}" for k, v in {**image.env(), **(env or {})}.items()])
    process["capabilities"] = {k: [] for k in ("bounding", "effective", "permitted", "inheritable", "ambient")}
    process.pop("rlimits", None)
    wanted = [m.spec() for m in mounts] + [Mount("/etc/hosts", str(hosts_file), read_only=True).spec()]
    taken = {m["destination"] for m in wanted}
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] not in taken] + wanted
    if not private_network:
        spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    (bundle / "config.json").write_text(json.dumps(spec))
    cid = f"aiaas-test-{uuid.uuid4().hex[:10]}"
    cmd = ["runc", "run", "--bundle", str(bundle), cid]
    if detach:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        proc.container_id = cid  # type: ignore[attr-defined]
        return proc
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    finally:
        subprocess.run(["runc", "delete", "--force", cid], capture_output=True, check=False)


def stop(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """SIGTERM a detached container, wait, remove it; return what it printed."""
    cid = proc.container_id  # type: ignore[attr-defined]
    subprocess.run(["runc", "kill", cid, "TERM"], capture_output=True, check=False)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["runc", "kill", cid, "KILL"], capture_output=True, check=False)
        out, _ = proc.communicate(timeout=timeout)
    subprocess.run(["runc", "delete", "--force", cid], capture_output=True, check=False)
    return out or ""


def archives(repo: Path) -> dict[str, Path]:
    """{image name: archive} of this tree, building what is missing (hack/images.sh build)."""
    out = sh(str(repo / "hack" / "images.sh"), "build", timeout=3600)
    return {m.group(1): Path(m.group(2)) for m in re.finditer(r"^(\S+) (\S+\.tar)$", out, re.M)}


def runtime_available() -> str | None:
    """Why images cannot run here, or None."""
    for tool in ("buildah", "runc"):
        if not shutil.which(tool):
            return f"{tool} not installed (apt-get install buildah runc; hack/images.sh installs them)"
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        return "buildah and runc run as root here"
    return None
