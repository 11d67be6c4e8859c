"""Dynamic batching: requests arriving within a few milliseconds share one encoder pass and one
faiss call.

A text encoder costs nearly the same for 1 text as for 32 on a CPU (per-call overhead dominates
small batches), and so does a faiss search over a batch of queries, so under concurrency one pass
over the waiting requests answers them all with one hop to a worker thread instead of two per
request. The first request of a batch waits at most `window_ms` for company; while a batch is
being processed, new requests queue and go together in the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

IDLE_EXIT_SECONDS = 5.0  # a worker with nothing to do ends, so batchers of replaced indexes are freed


class Batcher:
    """Run `process(list_of_items) -> list_of_results` (blocking; in the default thread pool) over
    items submitted one at a time from many coroutines.

    process: maps a batch to one result per item, in order.
    window_ms: how long the first item of a batch waits for more.
    max_batch: most items in one call.
    enabled: False processes every item on its own (the benchmark's baseline).
    """

    def __init__(
        self, process: Callable[[list], list], window_ms: float = 3.0, max_batch: int = 64, enabled: bool = True
    ):
        self.process = process
        self.window = window_ms / 1000.0
        self.max_batch = max_batch
        self.enabled = enabled
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if not self.enabled:
            self.batches += 1
            self.items += 1
            return (await loop.run_in_executor(None, self.process, [item]))[0]
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run(self._queue))
        fut: asyncio.Future = loop.create_future()
        assert self._queue is not None
        self._queue.put_nowait((item, fut))
        return await fut

    async def _run(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                batch = [await asyncio.wait_for(queue.get(), IDLE_EXIT_SECONDS)]
            except asyncio.TimeoutError:
                if queue.empty():
                    self._worker = None
                    return
                continue
            if self.window > 0:
                await asyncio.sleep(self.window)
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            live = [(x, f) for x, f in batch if not f.done()]  # a client that went away cancelled its future
            if not live:
                continue
            try:
                results = await loop.run_in_executor(None, self.process, [x for x, _ in live])
            except Exception as e:  # noqa: BLE001 (the error belongs to the requests, not the worker)
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.batches += 1
            self.items += len(live)
            for (_, f), r in zip(live, results):
                if not f.done():
                    f.set_result(r)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._worker = None
