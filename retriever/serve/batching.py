"""Dynamic batching of text queries: requests arriving within a few milliseconds share one encoder pass.

A text encoder costs nearly the same for 1 text as for 32 on a CPU (per-call overhead dominates
small batches), so under concurrency one pass over the waiting texts answers them all. The first
text of a batch waits at most `window_ms` for company; when the encoder is busy, texts queue and
go together in the next pass anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import numpy as np

EncodeFn = Callable[[Sequence[str]], np.ndarray]


class TextBatcher:
    """Encode texts one call at a time from many coroutines, batched behind the scenes.

    encode: blocking function texts -> (n, d) unit vectors; runs in the default thread pool.
    window_ms: how long the first text of a batch waits for more (0 with enabled=False: no batching).
    max_batch: most texts in one encoder pass.
    """

    def __init__(self, encode: EncodeFn, window_ms: float = 3.0, max_batch: int = 64, enabled: bool = True):
        self.encode_fn = encode
        self.window = window_ms / 1000.0
        self.max_batch = max_batch
        self.enabled = enabled
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0
        self.texts = 0

    async def encode(self, text: str) -> np.ndarray:
        """The (1, d) vector of one text."""
        loop = asyncio.get_running_loop()
        if not self.enabled:
            self.batches += 1
            self.texts += 1
            return await loop.run_in_executor(None, self.encode_fn, [text])
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run())
        fut: asyncio.Future = loop.create_future()
        await self._queue.put((text, fut))
        return await fut

    async def _run(self) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.window
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            live = [(t, f) for t, f in batch if not f.done()]  # a client that went away cancelled its future
            if not live:
                continue
            try:
                vectors = await loop.run_in_executor(None, self.encode_fn, [t for t, _ in live])
            except Exception as e:  # noqa: BLE001 (the error belongs to the requests, not the worker)
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.batches += 1
            self.texts += len(live)
            for i, (_, f) in enumerate(live):
                if not f.done():
                    f.set_result(vectors[i : i + 1])

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._worker = None
