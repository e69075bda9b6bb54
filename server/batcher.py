"""Dynamic batching: concurrent requests are stacked into one forward pass, run off the event loop.

Policy (Triton's dynamic batcher, adapted to an asyncio server):

* one worker runs one batch at a time; requests that arrive meanwhile queue up and form the next batch, so under
  load batches grow by themselves and a lone request never waits for company;
* a forward pass runs in a dedicated model thread, off the event loop, unless passes of its size have been
  measured to take less than ``inline_seconds`` (``--inline-forward-ms``): then it runs on the event loop itself.
  Handing a pass to a thread and its result back costs two thread wake-ups (measured about 25 us of CPU and
  80 us of latency on a busy 2-core machine), which for the small models here is a large part of a request;
  the loop is blocked for at most about ``inline_seconds`` per pass, and requests that arrive meanwhile wait in
  the socket buffers and join the next batch. Every pass is timed (:class:`PassTimes`, per power-of-two batch
  size), so a model or batch size that turns out slower goes back to the thread;
* a request from a lone client runs at once in its own handler when it would be a batch of its own anyway: the
  model idle, nothing queued or being received, a short pass for its size, and no other client connection
  sending within ``SHARED_WINDOW`` for ``Overlap.HOLD`` (:class:`Clients`). That skips the hand-off to the worker
  and back (three event-loop turns). Concurrent clients are told apart by their connections because a request
  run inline blocks the loop: the others wait unread in their sockets and could not be seen otherwise;
* when the model is idle the worker waits for more requests only while some are still being received by the
  HTTP layer (:meth:`Batcher.arrival_started`) and began less than ``max_delay`` ago (a stalled upload is not
  waited for), and never longer than ``max_delay`` after the first one;
* a batch holds at most ``max_batch_size`` samples and only requests whose per-sample shapes agree
  (variable-length inputs are batched with their own kind); a single larger request runs alone, in slices of
  ``max_batch_size`` samples, so no forward pass is larger than that;
* when a batch fails, each of its requests is retried alone, so one bad request cannot fail its neighbours;
* the queue is bounded: a request that would make more than ``max_queue_samples`` samples wait is refused at
  once (:class:`~.protocol.ProtocolError` 503 with a retry hint) instead of piling up memory and latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .protocol import ProtocolError

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
Wanted = frozenset[str] | None  # the outputs a request asks for (None: every output of the model)
Run = Callable[[list[np.ndarray], Wanted], Outputs]  # one forward pass: inputs, wanted outputs -> outputs


def union(wanted: list[Wanted]) -> Wanted:
    """The outputs a batch must compute for all of its requests."""
    return None if any(w is None for w in wanted) else frozenset().union(*wanted)  # type: ignore[arg-type]


@dataclass
class _Item:
    inputs: list[np.ndarray]
    key: tuple[tuple[int, ...], ...]
    rows: int
    future: asyncio.Future[Outputs]
    wanted: Wanted
    offload: bool  # run its pass in the model thread even if short (see submit)


def _resolve(future: asyncio.Future[Outputs], result: Outputs | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)


def _writable(inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The arrays as torch takes them: a read-only view of the request body (binary tensors) is copied."""
    return [a if a.flags.writeable and a.flags.c_contiguous else a.copy() for a in inputs]


def size_class(rows: int) -> int:
    """The power-of-two bucket of a batch size (1, 2, 4, 8, ...) under which pass durations are kept."""
    return 1 << max(0, rows - 1).bit_length()


class PassTimes:
    """How long forward passes of each power-of-two batch size usually take: a moving average that follows faster
    passes at once and slower ones slowly, so that a pass slowed by preemption on a busy machine hardly moves it
    (a lasting slowdown still shows after a few dozen passes)."""

    DOWN = 0.5  # weight of a pass faster than the estimate
    UP = 0.05  # weight of a slower one (counted as at most twice the estimate)

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}

    def record(self, rows: int, seconds: float) -> None:
        key = size_class(rows)
        old = self._seconds.get(key)
        if old is None:
            self._seconds[key] = seconds
        elif seconds < old:
            self._seconds[key] = old + self.DOWN * (seconds - old)
        else:
            self._seconds[key] = old + self.UP * (min(seconds, 2 * old) - old)

    def expected(self, rows: int) -> float | None:
        """The usual duration of a pass of ``rows`` samples; None before one of its size ran."""
        return self._seconds.get(size_class(rows))


class Overlap:
    """Whether requests have been seen overlapping within the last ``HOLD`` seconds. On its own it serves a
    front end that cannot tell clients apart (gRPC multiplexes every call on one connection)."""

    HOLD = 1.0

    def __init__(self) -> None:
        self._until = float("-inf")

    def seen(self, overlapping: bool, now: float) -> bool:
        """Record whether a request overlaps others at ``now``; True while overlapping ones are recent."""
        if overlapping:
            self._until = now + self.HOLD
        return now < self._until


class Clients:
    """Whether requests come from one client or several at a time, told by their connections: a request from a
    different connection within ``SHARED_WINDOW`` seconds of the previous one means concurrent clients, and
    requests count as shared for :attr:`Overlap.HOLD` seconds after that. A request without a connection (gRPC
    multiplexes its calls on one) always counts as shared."""

    SHARED_WINDOW = 0.010

    def __init__(self) -> None:
        self._last_source: int | None = None
        self._last_seen = float("-inf")
        self._shared = Overlap()

    def lone(self, source: int | None, now: float) -> bool:
        """Record a request from connection ``source`` at ``now``; True when it comes from a lone client."""
        if source is None:
            return False
        another = source != self._last_source and now - self._last_seen < self.SHARED_WINDOW
        self._last_source, self._last_seen = source, now
        return not self._shared.seen(another, now)


class Batcher:
    def __init__(
        self,
        run: Run,
        max_batch_size: int = 64,
        max_delay: float = 0.005,
        on_batch: Callable[[int], None] | None = None,
        max_queue_samples: int = 16384,
        inline_seconds: float = 0.0,
    ) -> None:
        self._run = run
        self.inline_seconds = max(0.0, inline_seconds)
        self.pass_times = PassTimes()
        self.max_batch_size = max(1, max_batch_size)
        self.max_delay = max(0.0, max_delay)
        self._on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self.max_queue_samples = max(1, max_queue_samples)
        self._queued_rows = 0  # samples in self._queue
        self._wakeup = asyncio.Event()
        self._jobs: queue.SimpleQueue[tuple[list[np.ndarray], Wanted, asyncio.Future[Outputs]] | None] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._arrivals: dict[int, float] = {}  # requests the HTTP layer is receiving -> when they began
        self._next_token = 0
        self._busy = False
        self._clients = Clients()

    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._model_thread, name="model", daemon=True)
            self._thread.start()
            self._task = self._loop.create_task(self._work(), name="batcher")

    def _model_thread(self) -> None:
        """Runs batches off the event loop, one at a time; a lighter hand-off than ``run_in_executor``."""
        loop = self._loop
        assert loop is not None
        while (job := self._jobs.get()) is not None:
            inputs, wanted, future = job
            try:
                result = self._timed_run(inputs, wanted)
            except Exception as e:  # handed to the waiting request, which answers it
                loop.call_soon_threadsafe(_resolve, future, None, e)
            except BaseException as e:  # never leave a request waiting forever
                loop.call_soon_threadsafe(_resolve, future, None, RuntimeError(repr(e)))
            else:
                loop.call_soon_threadsafe(_resolve, future, result, None)

    def _timed_run(self, inputs: list[np.ndarray], wanted: Wanted) -> Outputs:
        start = time.perf_counter()
        result = self._run(inputs, wanted)
        self.pass_times.record(int(inputs[0].shape[0]), time.perf_counter() - start)
        return result

    def _runs_inline(self, rows: int) -> bool:
        expected = self.pass_times.expected(rows)
        return expected is not None and expected < self.inline_seconds

    def _offload(self, inputs: list[np.ndarray], wanted: Wanted) -> asyncio.Future[Outputs]:
        assert self._loop is not None
        future: asyncio.Future[Outputs] = self._loop.create_future()
        self._jobs.put((inputs, wanted, future))
        return future

    async def stop(self) -> None:
        """Finish the queued requests, then stop the worker."""
        while self._queue or self._busy:
            await asyncio.sleep(0.001)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._thread is not None:
            self._jobs.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    def arrival_started(self) -> int:
        """The HTTP layer began receiving a request that it will submit; returns a token for arrival_ended."""
        token = self._next_token
        self._next_token += 1
        self._arrivals[token] = time.monotonic()
        return token

    def arrival_ended(self, token: int) -> None:
        self._arrivals.pop(token, None)

    def _expecting(self) -> bool:
        """Is a request being received that began recently enough to be worth waiting for?"""
        now = time.monotonic()
        return any(now - began < self.max_delay for began in self._arrivals.values())

    async def submit(self, inputs: list[np.ndarray], source: int | None = None, wanted: Wanted = None,
                     offload: bool = False) -> Outputs:
        """Queue one request (arrays with the batch first) and wait for its slice of the outputs it wants (at
        least; None: all of them). ``source`` names the client connection it came on (None: unknown).
        ``offload``: other requests are being served, so its pass runs in the model thread even if short,
        keeping the loop free to take them in meanwhile (a front end that hands the server one request per
        loop turn, like grpc.aio, batches only then)."""
        rows = int(inputs[0].shape[0])
        if self._queued_rows and self._queued_rows + rows > self.max_queue_samples:
            raise ProtocolError(
                503, f"the server is busy: {self._queued_rows} samples are waiting for the model; retry later", 1
            )
        if not offload and self._clients.lone(source, time.perf_counter()) and self._alone_now(rows):
            return self._run_alone(inputs, rows, wanted)
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        key = tuple(a.shape[1:] for a in inputs)
        self._queue.append(_Item(inputs, key, rows, future, wanted, offload))
        self._queued_rows += rows
        self._wakeup.set()
        return await future

    def _alone_now(self, rows: int) -> bool:
        """Would this request be a batch of its own, run inline, if queued now?"""
        return (not self._busy and not self._queue and rows <= self.max_batch_size and self._runs_inline(rows)
                and not self._expecting())

    def _run_alone(self, inputs: list[np.ndarray], rows: int, wanted: Wanted) -> Outputs:
        """One request's forward pass on the event loop, in its own handler (``_execute`` for a batch of one)."""
        if self._on_batch is not None:
            self._on_batch(rows)
        try:
            return self._timed_run(_writable(inputs), wanted)
        except Exception:
            log.exception("inference failed")
            raise

    def _take_batch(self, first: _Item, batch: list[_Item], rows: int) -> int:
        """Move queued items compatible with ``first`` into ``batch`` while they fit."""
        skipped: list[_Item] = []
        while self._queue and rows < self.max_batch_size:
            item = self._queue.popleft()
            if item.key != first.key or rows + item.rows > self.max_batch_size:
                skipped.append(item)
                continue
            batch.append(item)
            rows += item.rows
            self._queued_rows -= item.rows
        self._queue.extendleft(reversed(skipped))
        return rows

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._queue.popleft()
            self._queued_rows -= first.rows
            self._busy = True
            try:
                await self._collect_and_run(first)
            finally:
                self._busy = False

    async def _collect_and_run(self, first: _Item) -> None:
        batch = [first]
        rows = first.rows
        # Let handlers whose requests have already arrived submit them before the batch is closed. One pass
        # only: under load the next batch forms while this one runs, which keeps the model and the event loop
        # busy at the same time (gathering longer was measured to make throughput swing, not grow).
        await asyncio.sleep(0)
        rows = self._take_batch(first, batch, rows)
        deadline = time.monotonic() + self.max_delay
        while rows < self.max_batch_size and self._expecting():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            rows = self._take_batch(first, batch, rows)
        batch = [item for item in batch if not item.future.cancelled()]
        if batch:
            await self._execute(batch)

    def _stack(self, batch: list[_Item]) -> list[np.ndarray]:
        if len(batch) == 1:
            return _writable(batch[0].inputs)
        return [np.concatenate(parts) for parts in zip(*(item.inputs for item in batch), strict=True)]

    async def _forward(self, inputs: list[np.ndarray], wanted: Wanted, offload: bool) -> Outputs:
        """Forward passes of at most ``max_batch_size`` samples: a larger request is run in slices, which bounds
        the memory a single forward pass takes."""
        total = int(inputs[0].shape[0])
        parts: list[Outputs] = []
        for start in range(0, total, self.max_batch_size):
            chunk = inputs if total <= self.max_batch_size else [a[start : start + self.max_batch_size] for a in inputs]
            rows = int(chunk[0].shape[0])
            if self._on_batch is not None:
                self._on_batch(rows)
            parts.append(self._timed_run(chunk, wanted) if self._runs_inline(rows) and not offload
                         else await self._offload(chunk, wanted))
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            inputs = self._stack(batch)
            outputs = await self._forward(inputs, union([item.wanted for item in batch]),
                                          any(item.offload for item in batch))
        except Exception as e:  # a failure of the model, not of the event loop
            if len(batch) > 1:
                log.warning("a batch of %d requests failed (%s); retrying them one by one", len(batch), e)
                for item in batch:
                    await self._execute([item])
                return
            log.exception("inference failed")
            if not batch[0].future.done():
                batch[0].future.set_exception(e)
            return
        start = 0
        for item in batch:
            end = start + item.rows
            if not item.future.done():
                item.future.set_result({name: value[start:end] for name, value in outputs.items()})
            start = end
