"""The reconcile queue: one run per key at a time, bursts coalesced, delayed re-runs, first reconciles first
(operator/runtime.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

from aiaas.operator.runtime import KeyedQueue, same_object


def test_bursts_coalesce_and_runs_never_overlap():
    runs: list[tuple[str, str]] = []
    active: dict[tuple[str, str], int] = {}
    overlap = threading.Event()
    lock = threading.Lock()

    def work(key: tuple[str, str]) -> float | None:
        with lock:
            active[key] = active.get(key, 0) + 1
            if active[key] > 1:
                overlap.set()
        time.sleep(0.05)
        with lock:
            active[key] -= 1
            runs.append(key)
        return None

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            q = KeyedQueue(loop, pool, work, workers=4)
            for _ in range(50):
                q.enqueue(("ns", "a"))
                q.enqueue(("ns", "b"))
            while q.state:
                await asyncio.sleep(0.01)

    asyncio.run(main())
    assert not overlap.is_set()
    assert 1 <= runs.count(("ns", "a")) <= 2 and 1 <= runs.count(("ns", "b")) <= 2


def test_requeue_after_runs_again_and_the_earliest_request_wins():
    times: list[float] = []

    def work(key: tuple[str, str]) -> float | None:
        times.append(time.monotonic())
        return 0.2 if len(times) == 1 else None

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            q = KeyedQueue(loop, pool, work, workers=2)
            q.later(("ns", "a"), 5.0)
            q.enqueue(("ns", "a"))  # runs now, asks for a re-run in 0.2 s, which replaces the 5 s timer
            await asyncio.sleep(0.6)
            assert len(q.timers) == 0

    asyncio.run(main())
    assert len(times) == 2 and 0.15 < times[1] - times[0] < 0.5


def test_a_new_key_overtakes_the_follow_ups_of_older_ones_and_workers_are_capped():
    order: list[str] = []
    release = threading.Event()
    concurrent_runs, peak = [0], [0]
    lock = threading.Lock()

    def work(key: str) -> float | None:
        with lock:
            concurrent_runs[0] += 1
            peak[0] = max(peak[0], concurrent_runs[0])
        if key == "busy":
            release.wait(5)
        with lock:
            concurrent_runs[0] -= 1
            order.append(key)
        return None

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            q = KeyedQueue(loop, pool, work, workers=1, first=lambda key: key.startswith("new"))
            q.enqueue("busy")  # holds the only worker
            for key in ("old-a", "old-b", "new-1", "old-c", "new-2"):
                q.enqueue(key)
            release.set()
            while q.state:
                await asyncio.sleep(0.01)

    asyncio.run(main())
    assert order == ["busy", "new-1", "new-2", "old-a", "old-b", "old-c"]
    assert peak[0] == 1, "never more runs at once than workers, whatever the thread pool's size"


def test_a_recreated_namesake_is_not_forgotten_by_its_predecessors_deletion():
    new = {"metadata": {"name": "lenet-0", "uid": "new"}}
    assert not same_object(new, {"metadata": {"name": "lenet-0", "uid": "old"}})
    assert same_object(new, {"metadata": {"name": "lenet-0", "uid": "new"}})
    assert same_object(None, new)
