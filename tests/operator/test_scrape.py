"""The progress scrape against real HTTP servers on loopback that misbehave the way a TrainingJob's author could
make rank 0's /metrics misbehave: drip bytes, redirect, answer too much (issue 12, item 6)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from aiaas.contract import metrics as m
from aiaas.operator.reconcile_trainingjob import TrainingJobReconciler
from aiaas.operator.render import RenderSettings
from aiaas.operator.runtime import Runtime
from aiaas.operator.settings import OperatorSettings
from aiaas.operator.status_progress import http_fetch, scrape

GOOD = f"# TYPE {m.TRAINER_STEP} gauge\n{m.TRAINER_STEP} 7\n{m.TRAINER_TOTAL_STEPS} 10\n"


class Handler(BaseHTTPRequestHandler):
    stop = threading.Event()

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/drip":  # a byte every 0.3 s, forever: each read is quick, the answer never ends
            self.send_response(200)
            self.end_headers()
            while not self.stop.is_set():
                try:
                    self.wfile.write(b"#")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.3)
            return
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/metrics")
            self.end_headers()
            return
        body = (b"#" * (2 << 20)) if self.path == "/huge" else GOOD.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: Any) -> None:
        return


@pytest.fixture
def server() -> Iterator[str]:
    Handler.stop.clear()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        Handler.stop.set()
        srv.shutdown()
        srv.server_close()


def timed(fn: Any, limit: float) -> tuple[Any, float]:
    """Run ``fn`` on a thread; fail (instead of hanging the suite) if it takes longer than ``limit``."""
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    th = threading.Thread(target=lambda: out.setdefault("v", fn()), daemon=True)
    th.start()
    th.join(limit)
    assert not th.is_alive(), f"still running after {limit}s"
    return out.get("v"), time.monotonic() - t0


def test_a_well_behaved_endpoint_is_read(server: str) -> None:
    assert http_fetch(f"{server}/metrics", 5) == GOOD
    p = scrape(f"{server}/metrics", 5)
    assert p is not None and p.step == 7


def test_a_dripping_endpoint_ends_at_the_deadline(server: str) -> None:
    with pytest.raises(TimeoutError):
        http_fetch(f"{server}/drip", 1.0)
    value, took = timed(lambda: scrape(f"{server}/drip", 1.0), 20)
    assert value is None and took < 10, took  # the deadline is 1 s; generous for a loaded machine


def test_a_redirect_is_not_followed(server: str) -> None:
    with pytest.raises(ValueError, match="302"):
        http_fetch(f"{server}/redirect", 5)
    assert scrape(f"{server}/redirect", 5) is None


def test_an_oversized_answer_is_refused(server: str) -> None:
    with pytest.raises(ValueError, match="more than"):
        http_fetch(f"{server}/huge", 10)


class NoKube:
    """The runtime's API client; a resync with nothing to write never calls it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected API call {name}")


def test_a_stalled_probe_blocks_neither_the_resync_nor_other_reconciles() -> None:
    release = threading.Event()

    class Stalled(TrainingJobReconciler):
        def probe(self, snap: Any) -> Any:
            release.wait(30)
            return None

    rec = Stalled(RenderSettings())
    rt = Runtime(OperatorSettings(workers=2), NoKube(), [rec])  # type: ignore[arg-type]
    reconciled: list[Any] = []
    rt.reconcile = lambda ref: reconciled.append(ref)  # type: ignore[method-assign]
    rt.store.put("TrainingJob", {"metadata": {"name": "slow", "namespace": "ml", "resourceVersion": "1"},
                                 "status": {"phase": "Running"}})

    async def main() -> float:
        loop = asyncio.get_running_loop()
        rt.start(loop)
        t0 = time.monotonic()
        for _ in range(3):
            await asyncio.wait_for(rt.resync(), 5)
        took = time.monotonic() - t0
        await asyncio.sleep(0.5)
        release.set()
        await rt.stop()
        return took

    took = asyncio.run(main())
    assert took < 5 and reconciled, "resync returns at once and the job is still reconciled"
    assert len(rt._probing) <= 1
