"""Pod startup latency on the local cluster's real node (hack/cluster.sh).

Creates N small pods (the test image, already on the node: no pull) in a
namespace steered to the real node, and prints p50/p99 of creation -> Ready
against Kubernetes' pod-startup SLO (5 s at p99, images pre-pulled). Kubernetes
timestamps have 1 s resolution, so are these numbers.

    python hack/node/pod_startup.py [--pods 20]      (KUBECONFIG from hack/cluster.sh env)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime

SLO_SECONDS = 5.0
IMAGE = "localhost/aiaas-node-test:local"  # hack/node/node.sh NODE_IMAGE_TEST
STEER = {
    "scheduler.alpha.kubernetes.io/node-selector": "aiaas.dev/real-node=true",
    "scheduler.alpha.kubernetes.io/defaultTolerations": json.dumps(
        [{"key": "aiaas.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}]
    ),
}


def kubectl(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, check=True).stdout


def ts(s: str) -> float:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").timestamp()


def pods(n: int) -> str:
    items = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"p{i}"},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {"name": "main", "image": IMAGE, "imagePullPolicy": "Never", "command": ["/nodetest", "sleep"]}
                ],
            },
        }
        for i in range(n)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def latencies(ns: str, n: int, timeout: float = 600) -> list[float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = json.loads(kubectl("-n", ns, "get", "pods", "-o", "json"))["items"]
        ready = [
            ts(c["lastTransitionTime"]) - ts(p["metadata"]["creationTimestamp"])
            for p in items
            for c in p["status"].get("conditions", [])
            if c["type"] == "Ready" and c["status"] == "True"
        ]
        if len(ready) == n:
            return sorted(ready)
        time.sleep(1)
    raise SystemExit(f"only {len(ready)} of {n} pods became Ready within {timeout}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=20)
    n = ap.parse_args().pods
    ns = f"pod-startup-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    try:
        kubectl("annotate", "namespace", ns, *(f"{k}={v}" for k, v in STEER.items()))
        while subprocess.run(["kubectl", "-n", ns, "get", "sa", "default"], capture_output=True).returncode:
            time.sleep(0.5)
        t0 = time.monotonic()
        kubectl("-n", ns, "apply", "-f", "-", stdin=pods(n))
        lat = latencies(ns, n)
        wall = time.monotonic() - t0
    finally:
        kubectl("delete", "namespace", ns, "--wait=false")
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    print(f"{n} pods on the real node: startup p50 {p50:.0f} s, p99 {p99:.0f} s (SLO p99 <= {SLO_SECONDS:.0f} s: "
          f"{'met' if p99 <= SLO_SECONDS else 'MISSED'}); all Ready after {wall:.1f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
