"""`hack/cluster.sh down` leaves nothing of the real node behind on the machine:
processes, mounts, network interfaces, iptables chains and rules, cgroups,
sysctls, files outside the cluster directory. Nor does a node whose processes
were all killed (a crash, the end of a CI job): the next `up` removes it.

Starts a cluster of its own (its own directory and ports, one kwok node), so
it runs only where no real node runs yet (one per machine). This file sorts
before the others of tests/e2e/node, so in a plain run it goes before the
session cluster starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from e2e_util import REPO_ROOT, run, wait_for
from node_util import LOCAL_PATH_CLASS, STEER_ANNOTATIONS, pod

pytestmark = pytest.mark.e2e

CLUSTER_SH = REPO_ROOT / "hack" / "cluster.sh"
OWNER_FILE = Path("/run/aiaas-real-node.owner")  # hack/node/node.sh NODE_OWNER_FILE
NODE_PROCESSES = {"containerd", "containerd-shim-runc-v2", "kubelet", "kube-proxy", "coredns",
                  "local-path-provisioner", "runc", "pause", "nodetest", "local-path-helper"}


def _real_node_running() -> str | None:
    try:
        owner = OWNER_FILE.read_text().strip()
        pid = int(Path(owner, "run", "kubelet.pid").read_text())
        os.kill(pid, 0)
        return owner
    except (OSError, ValueError):
        return None


def _lines(cmd: list[str]) -> set[str]:
    if shutil.which(cmd[0]) is None:
        return set()
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    # iptables-save: drop comments and packet counters.
    return {re.sub(r"\[\d+:\d+\]", "", line) for line in out.splitlines() if line and not line.startswith("#")}


def _processes(cluster_dir: str) -> set[str]:
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            exe = os.path.basename(os.readlink(proc / "exe"))
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if exe in NODE_PROCESSES or cluster_dir in cmdline:
            found.add(f"{proc.name} {exe} {cmdline[:120]}")
    return found


# What the node creates is recognisable by name; other work on the machine
# (image builds, other clusters) may add and remove its own mounts, links and
# rules meanwhile, which must not fail this test.
NODE_PATTERN = re.compile(r"aiaas|veth|KUBE-|CNI-|cni0|10\.244\.|kubelet|containerd")


def _ours(lines: set[str], cluster_dir: str) -> set[str]:
    return {line for line in lines if NODE_PATTERN.search(line) or cluster_dir in line}


def _host_state(cluster_dir: str) -> dict[str, set[str]]:
    mounts = set(_mount_points())
    return {
        "mounts": _ours(mounts, cluster_dir),
        "links": _ours({line.split(":")[1].strip().split("@")[0] for line in _lines(["ip", "-o", "link"])}, cluster_dir),
        "addresses": _ours(_lines(["ip", "-o", "addr"]), cluster_dir),
        "iptables": _ours(_lines(["iptables-save"]), cluster_dir),
        "ip6tables": _ours(_lines(["ip6tables-save"]), cluster_dir),
        "nft tables": _lines(["nft", "list", "tables"]),
        "processes": _processes(cluster_dir),
        "cgroups": {str(p) for p in Path("/sys/fs/cgroup").glob("*/aiaas-node")},
        "sysctls": {f"{s}={Path('/proc/sys', s).read_text().strip()}"
                    for s in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables")
                    if Path("/proc/sys", s).exists()},
        "files": {str(p) for d in ("/run/containerd", "/var/lib/cni", "/var/log/containers", "/var/log/pods")
                  for p in Path(d).glob("*")} | ({str(OWNER_FILE)} if OWNER_FILE.exists() else set()),
    }


def _skip_unless_a_real_node_can_start() -> None:
    if os.geteuid() != 0:
        pytest.skip("the real node needs root")
    if owner := _real_node_running():
        pytest.skip(f"a real node already runs on this machine (cluster {owner}); run this test alone: "
                    f"pytest -m e2e {Path(__file__).relative_to(REPO_ROOT)}")


def _cluster_env(cluster_dir: str, port_shift: int) -> dict[str, str]:
    """A one-kwok-node cluster with a real node, in its own dir and ports."""
    offset = int(os.environ.get("AIAAS_PORT_OFFSET", "0")) + port_shift
    return {**os.environ, "AIAAS_CLUSTER_DIR": cluster_dir, "AIAAS_PORT_OFFSET": str(offset),
            "AIAAS_REAL_NODE": "1", "AIAAS_GPU_NODES": "0", "AIAAS_CPU_NODES": "1"}


def _left_behind(before: dict[str, set[str]], after: dict[str, set[str]]) -> dict[str, list[str]]:
    return {k: sorted(after[k] - before[k]) for k in before if after[k] - before[k]}


def test_down_leaves_nothing_of_the_real_node(tmp_path_factory):
    _skip_unless_a_real_node_can_start()
    cluster_dir = str(tmp_path_factory.mktemp("down") / "cluster")
    env = _cluster_env(cluster_dir, 500)
    before = _host_state(cluster_dir)
    up = run([str(CLUSTER_SH), "up"], check=False, env=env, timeout=3600)
    try:
        assert up.returncode == 0, f"up failed:\n{up.stderr}"
        _use_the_node(env, cluster_dir)
        during = _host_state(cluster_dir)
        assert during["processes"] and during["links"] - before["links"], "the node left no trace to clean up"
    finally:
        down = run([str(CLUSTER_SH), "down"], check=False, env=env, timeout=600)
    assert down.returncode == 0, down.stderr
    wait_for(lambda: not _processes(cluster_dir), timeout=30, what="the node's processes to exit")
    left = _left_behind(before, _host_state(cluster_dir))
    assert not left, f"down left behind: {json.dumps(left, indent=1)}"
    assert not Path(cluster_dir).exists()


def test_up_cleans_up_after_a_killed_node(tmp_path_factory):
    """Every process of a cluster SIGKILLed (pods, shims, containerd, kubelet, control plane) leaves
    mounts, veths, chains, cgroups and the owner file; `up` of another cluster removes them first."""
    _skip_unless_a_real_node_can_start()
    both = tmp_path_factory.mktemp("killed")
    killed_dir, next_dir = str(both / "killed"), str(both / "next")
    killed_env, next_env = _cluster_env(killed_dir, 500), _cluster_env(next_dir, 600)
    before = _host_state(str(both))
    try:
        run([str(CLUSTER_SH), "up"], env=killed_env, timeout=3600)
        _use_the_node(killed_env, killed_dir)
        _kill_everything_of(killed_dir)
        assert _mounts_under(killed_dir), "the killed node left no mounts to clean up"
        up = run([str(CLUSTER_SH), "up"], check=False, env=next_env, timeout=3600)
        assert up.returncode == 0, f"up after a killed node failed:\n{up.stderr[-4000:]}"
        assert f"cleaning up after the real node of {killed_dir}" in up.stderr
        assert not _mounts_under(killed_dir) and not Path(killed_dir, "node").exists()
    finally:
        run([str(CLUSTER_SH), "down"], check=False, env=next_env, timeout=600)
        run([str(CLUSTER_SH), "down"], check=False, env=killed_env, timeout=600)
    wait_for(lambda: not _processes(str(both)), timeout=30, what="the nodes' processes to exit")
    left = _left_behind(before, _host_state(str(both)))
    assert not left, f"the killed node or the next one left behind: {json.dumps(left, indent=1)}"


def _mount_points() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def _mounts_under(directory: str) -> list[str]:
    return [m for m in _mount_points() if m.startswith(directory + "/")]


def _kill_everything_of(cluster_dir: str) -> None:
    """SIGKILL, as the end of a job does: each process the cluster started (its pid files), each
    one whose command line names the cluster dir (containerd's shims) and each one in the node's cgroups."""
    def victims() -> set[int]:
        pids = {int(pid) for procs in Path("/sys/fs/cgroup").glob("*/aiaas-node/**/cgroup.procs")
                for pid in procs.read_text().split()}
        pids |= {int(pid) for f in Path(cluster_dir, "run").glob("*.pid")
                 if Path("/proc", pid := f.read_text().strip(), "cmdline").exists()}
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and cluster_dir.encode() in (proc / "cmdline").read_bytes():
                    pids.add(int(proc.name))
            except OSError:
                continue
        return pids - {os.getpid()}

    for _ in range(20):
        if not (pids := victims()):
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    raise AssertionError(f"processes of {cluster_dir} survived SIGKILL: {sorted(victims())}")


def _use_the_node(env: dict[str, str], cluster_dir: str) -> None:
    """A pod with a local-path volume behind a Service: veths, mounts, iptables rules."""
    kubectl = [str(Path(run([str(CLUSTER_SH), "bin-dir"], env=env).stdout.strip()) / "kubectl"),
               f"--kubeconfig={cluster_dir}/kubeconfig", "--namespace=down"]
    run([*kubectl, "create", "namespace", "down"], env=env)
    run([*kubectl, "annotate", "namespace", "down", *(f"{k}={v}" for k, v in STEER_ANNOTATIONS.items())], env=env)
    wait_for(lambda: run([*kubectl, "get", "serviceaccount", "default"], check=False).returncode == 0,
             timeout=60, what="the default service account")
    server = pod("server", ["serve", "8080"], labels={"app": "server"}, restart="Always",
                 volumes=[{"name": "d", "persistentVolumeClaim": {"claimName": "d"}}],
                 mounts=[{"name": "d", "mountPath": "/d"}])
    docs = [
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "d"},
         "spec": {"storageClassName": LOCAL_PATH_CLASS, "accessModes": ["ReadWriteOnce"],
                  "resources": {"requests": {"storage": "1Mi"}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "server"},
         "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080}]}},
        server,
    ]
    run([*kubectl, "apply", "-f", "-"], input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    run([*kubectl, "wait", "--for=condition=Ready", "pod/server", "--timeout=240s"], timeout=300)
