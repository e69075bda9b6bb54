"""The dynamic batcher on its own: batching policy, limits, shape grouping and failure isolation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest

from aiaas.server.batcher import Batcher


class Recorder:
    """A model that doubles its input and remembers the batch sizes it saw."""

    def __init__(self, delay: float = 0.0, fail_on: float | None = None) -> None:
        self.batches: list[int] = []
        self.delay = delay
        self.fail_on = fail_on
        self.threads: set[str] = set()
        self.wanted: list[frozenset[str] | None] = []

    def __call__(self, inputs: list[np.ndarray], wanted: frozenset[str] | None = None) -> dict[str, np.ndarray]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(int(inputs[0].shape[0]))
        self.wanted.append(wanted)
        if self.fail_on is not None and (inputs[0] == self.fail_on).any():
            raise ValueError("poisoned input")
        time.sleep(self.delay)
        return {"double": inputs[0] * 2, "sum": inputs[0].reshape(len(inputs[0]), -1).sum(axis=1)}


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def rows(value: float, n: int = 1, width: int = 3) -> list[np.ndarray]:
    return [np.full((n, width), value, dtype=np.float32)]


def test_a_lone_request_does_not_wait_for_company() -> None:
    model = Recorder()

    async def main() -> float:
        batcher = Batcher(model, max_batch_size=8, max_delay=2.0)
        batcher.start()
        start = time.perf_counter()
        out = await batcher.submit(rows(1.0))
        elapsed = time.perf_counter() - start
        np.testing.assert_array_equal(out["double"], np.full((1, 3), 2.0))
        await batcher.stop()
        return elapsed

    assert run(main()) < 1.0  # far below max_delay
    assert model.batches == [1]
    assert model.threads == {"model"}  # off the event loop


def test_concurrent_requests_share_forward_passes_within_the_limit() -> None:
    model = Recorder(delay=0.02)

    async def main() -> list[dict[str, np.ndarray]]:
        batcher = Batcher(model, max_batch_size=8, max_delay=0.005)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(rows(float(i))) for i in range(40)))
        await batcher.stop()
        return list(results)

    results = run(main())
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out["double"], np.full((1, 3), 2.0 * i))
        assert out["sum"].tolist() == [3.0 * i]
    assert sum(model.batches) == 40
    assert max(model.batches) <= 8
    assert len(model.batches) < 40


def test_large_requests_run_in_slices_and_shapes_are_not_mixed() -> None:
    model = Recorder(delay=0.01)

    async def main() -> None:
        batcher = Batcher(model, max_batch_size=4, max_delay=0.005)
        batcher.start()
        ramp = [np.arange(30, dtype=np.float32).reshape(10, 3)]
        big, a, b, c = await asyncio.gather(
            batcher.submit(ramp), batcher.submit(rows(2.0)), batcher.submit(rows(3.0, width=5)),
            batcher.submit(rows(4.0)),
        )
        np.testing.assert_array_equal(big["double"], ramp[0] * 2)
        assert big["sum"].shape == (10,) and c["double"].shape == (1, 3)
        assert b["double"].shape == (1, 5)
        await batcher.stop()

    run(main())
    assert max(model.batches) <= 4  # the 10-sample request ran as 4 + 4 + 2
    assert sum(model.batches) == 13


def test_a_failing_request_does_not_fail_its_batch_neighbours() -> None:
    model = Recorder(delay=0.01, fail_on=13.0)

    async def main() -> list[object]:
        batcher = Batcher(model, max_batch_size=16, max_delay=0.005)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(rows(float(i))) for i in range(20)),
                                       return_exceptions=True)
        await batcher.stop()
        return list(results)

    results = run(main())
    for i, result in enumerate(results):
        if i == 13:
            assert isinstance(result, ValueError)
        else:
            assert isinstance(result, dict), result
            assert result["sum"].tolist() == [3.0 * i]


def test_waits_a_bounded_time_for_requests_still_arriving() -> None:
    model = Recorder()

    async def main() -> float:
        batcher = Batcher(model, max_batch_size=8, max_delay=0.5)
        batcher.start()
        token = batcher.arrival_started()  # a request whose body is still being received

        async def late() -> dict[str, np.ndarray]:
            await asyncio.sleep(0.01)
            batcher.arrival_ended(token)
            return await batcher.submit(rows(2.0))

        start = time.perf_counter()
        await asyncio.gather(batcher.submit(rows(1.0)), late())
        elapsed = time.perf_counter() - start
        batcher.arrival_started()  # never arrives: the batch still goes after max_delay
        start = time.perf_counter()
        await batcher.submit(rows(3.0))
        waited = time.perf_counter() - start
        assert waited >= 0.45
        # a stalled upload that began long ago is not waited for at all
        start = time.perf_counter()
        await batcher.submit(rows(4.0))
        assert time.perf_counter() - start < 0.4
        await batcher.stop()
        return elapsed

    assert run(main()) < 0.4  # the late request joined well before max_delay
    assert model.batches == [2, 1, 1]


@pytest.mark.parametrize("size", [0, -3])
def test_limits_are_clamped(size: int) -> None:
    assert Batcher(Recorder(), max_batch_size=size, max_delay=-1).max_batch_size == 1


def test_the_queue_is_bounded() -> None:
    """While the model is busy, requests queue up to max_queue_samples; the next is refused with 503 at once."""
    from aiaas.server.protocol import ProtocolError

    gate = threading.Event()

    def blocked(inputs: list[np.ndarray], wanted: frozenset[str] | None) -> dict[str, np.ndarray]:
        gate.wait(60)
        return {"double": inputs[0] * 2}

    async def main() -> tuple[list[Any], ProtocolError]:
        batcher = Batcher(blocked, max_batch_size=4, max_delay=0, max_queue_samples=8)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(rows(1.0, 4)))  # taken by the model, which blocks
        while batcher._queued_rows or not batcher._busy:
            await asyncio.sleep(0.001)
        queued = [asyncio.ensure_future(batcher.submit(rows(2.0, 4))) for _ in range(2)]  # 8 samples wait
        await asyncio.sleep(0)
        with pytest.raises(ProtocolError) as refused:
            await batcher.submit(rows(3.0, 1))
        gate.set()
        results = await asyncio.gather(running, *queued)
        await batcher.stop()
        return results, refused.value

    results, refused = run(main())
    assert refused.status == 503 and refused.retry_after == 1 and "retry later" in refused.message
    assert [r["double"][0, 0] for r in results] == [2.0, 4.0, 4.0]


def test_fast_passes_run_on_the_event_loop_slow_ones_in_the_model_thread() -> None:
    """The first pass of a size is timed in the model thread; once passes of that size are known to take less
    than inline_seconds they run on the loop's own thread. A slow model never leaves the model thread."""

    async def main(model: Recorder) -> list[str]:
        batcher = Batcher(model, max_batch_size=8, max_delay=0.0, inline_seconds=0.05)
        batcher.start()
        seen = []
        for _ in range(3):
            model.threads.clear()
            out = await batcher.submit(rows(1.0))
            np.testing.assert_array_equal(out["double"], np.full((1, 3), 2.0))
            seen.append(model.threads.pop())
        await batcher.stop()
        return seen

    fast = run(main(Recorder()))
    assert fast == ["model", "MainThread", "MainThread"], fast
    slow = run(main(Recorder(delay=0.1)))
    assert slow == ["model", "model", "model"], slow


def test_pass_times_shrug_off_one_slow_pass() -> None:
    from aiaas.server.batcher import PassTimes, size_class

    assert [size_class(n) for n in (1, 2, 3, 4, 5, 64, 65)] == [1, 2, 4, 4, 8, 64, 128]
    times = PassTimes()
    assert times.expected(3) is None
    times.record(3, 0.001)
    times.record(4, 0.050)  # preempted: counted as at most twice the estimate, with a small weight
    assert times.expected(4) == pytest.approx(0.001 + 0.05 * 0.001)
    times.record(4, 0.0005)  # a faster pass is followed at once (half way)
    assert times.expected(3) == pytest.approx((0.00105 + 0.0005) / 2)
    for _ in range(100):  # a lasting slowdown shows after a few dozen passes
        times.record(4, 0.010)
    assert times.expected(4) > 0.009


def test_clients_are_told_apart_by_their_connections() -> None:
    from aiaas.server.batcher import Clients, Overlap

    clients, hold, window = Clients(), Overlap.HOLD, Clients.SHARED_WINDOW
    assert [clients.lone(7, t) for t in (0.0, 0.001, 0.002)] == [True, True, True]  # one connection, back to back
    assert clients.lone(8, 0.003) is False  # another connection right after it: several clients
    assert clients.lone(7, 0.5) is False  # ... for a while
    assert clients.lone(7, 0.003 + hold) is True
    assert clients.lone(9, 0.003 + hold + 2 * window) is True  # a new connection long after the last request
    assert clients.lone(None, 10.0) is False  # no connection to tell by (gRPC): always shared


def test_overlapping_calls_are_remembered_for_a_while() -> None:
    from aiaas.server.batcher import Overlap

    overlap, hold = Overlap(), Overlap.HOLD
    assert overlap.seen(False, 0.0) is False  # one call at a time
    assert overlap.seen(True, 1.0) is True
    assert overlap.seen(False, 1.0 + hold / 2) is True  # a call alone right after overlapping ones
    assert overlap.seen(False, 1.0 + hold) is False


def test_a_lone_client_runs_in_its_own_handler_and_concurrent_clients_still_batch() -> None:
    """A request from a lone client skips the hand-off to the worker once passes of its size are known to be
    short; requests from several connections at once go to the worker and share passes, even though a request
    run in its handler blocks the loop and the others could not be seen arriving."""
    tasks: list[tuple[str, int]] = []  # who ran each pass, and its size

    def model(inputs: list[np.ndarray], wanted: frozenset[str] | None) -> dict[str, np.ndarray]:
        task = asyncio.current_task() if threading.current_thread() is threading.main_thread() else None
        tasks.append((task.get_name() if task else "model thread", len(inputs[0])))
        return {"double": inputs[0] * 2}

    async def main() -> list[list[tuple[str, int]]]:
        batcher = Batcher(model, max_batch_size=8, max_delay=0.0, inline_seconds=0.05)
        batcher.start()
        rounds = []
        for n_clients in (1, 1, 4):
            tasks.clear()
            jobs = [asyncio.create_task(batcher.submit(rows(1.0), source=c), name=f"client-{c}")
                    for c in range(n_clients)]
            outs = await asyncio.gather(*jobs)
            assert all(np.array_equal(o["double"], np.full((1, 3), 2.0)) for o in outs)
            rounds.append(list(tasks))
        await batcher.stop()
        return rounds

    rounds = run(main())
    assert rounds[0] == [("model thread", 1)], rounds  # the first pass of a size is timed off the loop
    assert rounds[1] == [("client-0", 1)], rounds  # a lone client: its own handler ran the model
    # four connections at once: the first one still looks alone, the other three are seen and batched together
    # (by the worker, in the model thread: passes of 3 samples have not been timed yet)
    assert rounds[2] == [("client-0", 1), ("model thread", 3)], rounds


def test_a_batch_computes_the_outputs_its_requests_want() -> None:
    model = Recorder()

    async def main() -> None:
        batcher = Batcher(model, max_batch_size=8, max_delay=0.005)
        batcher.start()
        await asyncio.gather(batcher.submit(rows(1.0), wanted=frozenset({"sum"})),
                             batcher.submit(rows(2.0), wanted=frozenset({"double"})))
        await asyncio.gather(batcher.submit(rows(1.0), wanted=frozenset({"sum"})), batcher.submit(rows(2.0)))
        await batcher.stop()

    run(main())
    assert model.batches == [2, 2]
    assert model.wanted == [frozenset({"sum", "double"}), None], "the union; None (all) when one wants all"


def test_the_served_model_computes_only_the_wanted_outputs(cnn_artifact: Any) -> None:
    from aiaas.server.model import load

    model = load(cnn_artifact, threads=1)
    x = [np.zeros((2, *model.inputs[0].shape[1:]), dtype=np.float32)]
    every = model.predict(x)
    assert set(every) == {s.name for s in model.outputs} and len(every) > 1
    for name in every:
        only = model.predict(x, frozenset({name}))
        assert list(only) == [name]
        np.testing.assert_allclose(only[name], every[name], rtol=1e-6)


def test_offloaded_requests_run_in_the_model_thread_even_when_short() -> None:
    """A request marked offload (others are being served: the gRPC front end) leaves the loop free during its
    pass, however short; without the mark a short pass runs on the loop."""
    model = Recorder()

    async def main() -> list[str]:
        batcher = Batcher(model, max_batch_size=8, max_delay=0.0, inline_seconds=0.05)
        batcher.start()
        seen = []
        for offload in (False, False, True, False):
            model.threads.clear()
            await batcher.submit(rows(1.0), offload=offload)
            seen.append(model.threads.pop())
        await batcher.stop()
        return seen

    assert run(main()) == ["model", "MainThread", "model", "MainThread"]
