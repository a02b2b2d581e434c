"""Merge queued requests into one model batch whenever the model is free (asyncio; no Ray).

Why: Ray Serve's ``@serve.batch`` (2.60) forms batches in a loop that does not wait for the running batch:
``wait_for_batch`` returns whatever arrived within ``batch_wait_timeout_s`` and hands it to a task that then waits
for the ``max_concurrent_batches`` semaphore. While one generation runs (seconds on a CPU), the requests arriving
meanwhile are cut into many small batches that run one after another. Measured on runs/tiny with 64 concurrent
single-item requests over 4 experts: a mean generation batch of 3.3 instead of ~16, and 1.45x the throughput of
``max_batch_size=1`` instead of several times.

:class:`MergingBatcher` sits behind ``@serve.batch`` (which still collects calls that arrive together): every
``@serve.batch`` call submits its items here and awaits them; one worker runs the model on up to
``max_batch_size`` queued items at a time, taking everything that queued while the previous batch ran. When the
worker is idle, it waits up to ``wait_s`` after the first item for more (the usual dynamic-batching window), so a
lone request costs at most ``wait_s`` of latency and a busy model never runs a small batch while items wait.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Optional, Sequence

log = logging.getLogger(__name__)


class MergingBatcher:
    """``await batcher.submit(items)`` -> one result per item, computed by ``fn(list_of_items) -> list_of_results``
    (a synchronous function, run in a worker thread so the event loop keeps accepting requests) in merged batches
    of at most ``max_batch_size`` items, in arrival order. An exception from ``fn`` fails that batch's items only.
    """

    def __init__(self, fn: Callable[[list], Sequence[Any]], max_batch_size: int, wait_s: float = 0.01,
                 run: Optional[Callable[..., Awaitable]] = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.fn = fn
        self.max_batch_size = int(max_batch_size)
        self.wait_s = float(wait_s)
        self._run = run or asyncio.to_thread
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._event: Optional[asyncio.Event] = None
        self._worker: Optional[asyncio.Task] = None
        self.batches: list[int] = []  # sizes of the batches run (the last 1000)
        self.busy_s = 0.0

    def _ensure_worker(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, items: Sequence[Any]) -> list:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures))
        self._ensure_worker()
        self._event.set()
        return list(await asyncio.gather(*futures))

    @property
    def queued(self) -> int:
        return len(self._pending)

    def alive(self) -> bool:
        return self._worker is None or not self._worker.done()

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                self._event.clear()
                await self._event.wait()
                # idle until now: give simultaneous arrivals a short window to join the first batch
                deadline = time.monotonic() + self.wait_s
                while len(self._pending) < self.max_batch_size and time.monotonic() < deadline:
                    self._event.clear()
                    try:
                        await asyncio.wait_for(self._event.wait(), max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        break
            take = [(item, fut) for item, fut in self._pending[:self.max_batch_size]]
            del self._pending[:len(take)]
            live = [(item, fut) for item, fut in take if not fut.done()]  # cancelled callers drop out
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                results = await self._run(self.fn, [item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
            except Exception as e:  # noqa: BLE001 - delivered to the callers of this batch
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(e)
            else:
                for (_, fut), res in zip(live, results):
                    if not fut.done():
                        fut.set_result(res)
            finally:
                self.busy_s += time.perf_counter() - t0
                self.batches.append(len(live))
                del self.batches[:-1000]
