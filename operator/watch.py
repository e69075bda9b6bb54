"""kopf wiring: watches only. Each reconciler's resource and children are watched with ``on.event`` and handed
to :class:`.runtime.Runtime`; kopf never writes annotations, finalizers or status fields of its own into our
resources (:func:`kopf_settings`). Nothing here decides anything, and nothing here knows a kind by name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, cast

import kopf

from . import api
from .reconciler import Body, ChildWatch
from .runtime import Runtime


def kopf_settings(children: Iterable[ChildWatch] = ()) -> kopf.OperatorSettings:
    """How kopf runs for us: no Events or annotations of its own, no diff base, long watches, short-lived
    per-object workers, and the ``children`` watched with their owner label as a server-side selector (see
    :func:`child_selectors`)."""
    ksettings = kopf.OperatorSettings()
    ksettings.posting.enabled = False
    ksettings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.aiaas.dev")
    ksettings.persistence.diffbase_storage = _NoDiffBase(prefix="kopf.aiaas.dev")
    ksettings.watching.server_timeout = 300
    ksettings.watching.client_timeout = 330
    ksettings.networking.request_timeout = 60
    # kopf keeps a worker task per object until it has been idle this long (default 5 s): under a burst of
    # new jobs, thousands of them at once. 0.5 s: peak RSS at N=1000 128 MiB instead of 152-158 (bench/)
    ksettings.queueing.idle_timeout = 0.5
    for (group, version, plural), selector in child_selectors(children).items():
        ksettings.watching.label_selectors[group, version, plural] = selector
    return ksettings


def child_selectors(children: Iterable[ChildWatch]) -> dict[tuple[str, str, str], str]:
    """The label selector each watched child resource can be listed and watched with: its owner label's
    presence, so the API server sends only our children's events, not every pod of the cluster. kopf joins
    all selectors of a resource by "and", so a resource watched under two owner labels gets none (the
    handlers' own label filters still apply)."""
    labels: dict[tuple[str, str, str], set[str]] = {}
    for child in children:
        labels.setdefault((child.group, child.version, child.plural), set()).add(child.owner_label)
    return {resource: next(iter(owner)) for resource, owner in labels.items() if len(owner) == 1}


class _NoDiffBase(kopf.AnnotationsDiffBaseStorage):  # type: ignore[misc]
    """kopf deep-copies every watched object on every event to diff it for on.create/on.update handlers. This
    operator has none (it is level-triggered over on.event), so the copy is pure cost (~2 ms per event)."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        return None


def register(registry: kopf.OperatorRegistry, rt: Runtime) -> None:
    """Attach login, start/stop and one event handler per watched kind to ``registry``."""

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)  # in-cluster token or the kubeconfig, as the kubernetes client

    @kopf.on.startup(registry=registry)
    async def startup(**_: Any) -> None:
        rt.start(asyncio.get_running_loop())
        rt.health.ready = True

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        rt.health.ready = False
        await rt.stop()

    for kind, rec in rt.reconcilers.items():
        _watch_resource(registry, rt, kind, rec.plural)
        for child in rec.children:
            _watch_child(registry, rt, kind, child)


def _watch_resource(registry: kopf.OperatorRegistry, rt: Runtime, kind: str, plural: str) -> None:
    async def on_event(event: kopf.RawEvent, **_: Any) -> None:
        rt.observe(kind, event.get("type"), cast(Body, event["object"]))

    kopf.on.event(api.GROUP, api.VERSION, plural, id=f"watch-{plural}", registry=registry)(on_event)


def _watch_child(registry: kopf.OperatorRegistry, rt: Runtime, owner_kind: str, child: ChildWatch) -> None:
    async def on_event(event: kopf.RawEvent, **_: Any) -> None:
        rt.observe_child(owner_kind, child, event.get("type"), cast(Body, event["object"]))

    kopf.on.event(child.group, child.version, child.plural, id=f"watch-{child.plural}-of-{owner_kind}",
                  labels={child.owner_label: kopf.PRESENT}, registry=registry)(on_event)
