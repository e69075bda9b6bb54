"""The kopf floor: what watching costs before any reconciling, for bench/operator_bench.py's ``kopf`` phase.

    python bench/kopf_floor.py NAMESPACE        # started by operator_bench.py; prints "ready"

A kopf operator with the aiaas operator's kopf settings (:func:`aiaas.operator.watch.kopf_settings`) and its
three watches -- TrainingJobs, and StatefulSets and pods by the job-name label -- whose handlers do nothing but,
for a new TrainingJob, one POST of the StatefulSet the renderer produces (what the bare watcher does). Its CPU
per job is the least any operator built on kopf pays for the same events; the aiaas operator's CPU above it is
the runtime's and the reconcilers' own.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any


def run(namespace: str) -> int:
    import kopf
    from kubernetes import client, config

    from aiaas.contract import launch
    from aiaas.operator import api
    from aiaas.operator.render import RenderSettings, render_trainingjob
    from aiaas.operator.watch import kopf_settings

    config.load_kube_config()
    apps = client.AppsV1Api()
    settings = RenderSettings()
    registry = kopf.OperatorRegistry()

    def create_statefulset(body: dict[str, Any]) -> None:
        job = api.TrainingJob.model_validate(dict(body))
        sts = next(m for m in render_trainingjob(job, settings) if m["kind"] == "StatefulSet")
        try:
            apps.create_namespaced_stateful_set(namespace, sts)  # type: ignore[arg-type]
        except client.ApiException as err:
            if err.status != 409:
                print(f"create failed: {err.reason}", file=sys.stderr, flush=True)

    @kopf.on.event(api.GROUP, api.VERSION, "trainingjobs", registry=registry)
    async def on_job(event: kopf.RawEvent, **_: Any) -> None:
        if event.get("type") in (None, "ADDED"):
            await asyncio.to_thread(create_statefulset, event["object"])

    for plural, group, version in (("statefulsets", "apps", "v1"), ("pods", "", "v1")):
        @kopf.on.event(group, version, plural, labels={launch.LABEL_JOB: kopf.PRESENT}, registry=registry)
        async def on_child(**_: Any) -> None:
            return None

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def ready(**_: Any) -> None:
        print("ready", flush=True)

    asyncio.run(kopf.operator(registry=registry, settings=kopf_settings(), standalone=True, clusterwide=False,
                              namespaces=[namespace]))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
