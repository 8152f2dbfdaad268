"""Server-side batching: concurrent requests to one signature of one version become one model call.

A model call costs about the same for 1 row as for 64 (the fixed per-call overhead dominates small
models), so under load merging requests multiplies throughput. Like TF Serving's batcher, a batch runs
when it holds `max_batch_size` rows or its oldest request has waited `timeout_s`; unlike it, a batch also
runs as soon as a pass of the event loop brings no new request, so a lone request is not held back for
the timeout. While one batch runs the next one fills up, so under load batches form without waiting.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Awaitable, Callable, Hashable, Mapping

import numpy as np

from beam_pipeline.serving.errors import BadRequestError
from beam_pipeline.serving.models import Servable

Outputs = dict[str, np.ndarray]
# Runs `servable.run(signature, inputs)` off the event loop (the server passes a thread-pool runner).
Runner = Callable[[Servable, str, Mapping[str, np.ndarray]], Awaitable[Outputs]]


@dataclasses.dataclass
class _Task:
    inputs: Mapping[str, np.ndarray]
    rows: int
    enqueued: float
    future: asyncio.Future[Outputs]


@dataclasses.dataclass
class _Queue:
    servable: Servable
    signature: str
    tasks: collections.deque[_Task] = dataclasses.field(default_factory=collections.deque)
    rows: int = 0
    worker: asyncio.Task[None] | None = None


class Batcher:
    """One queue (and at most one worker task) per (servable, signature, non-batch input shapes).

    The worker exits when its queue is empty, so queues of unloaded versions do not linger.
    """

    def __init__(self, runner: Runner, max_batch_size: int, timeout_s: float):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if timeout_s < 0:
            raise ValueError(f"batch timeout must be >= 0, got {timeout_s}")
        self._runner = runner
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self._queues: dict[Hashable, _Queue] = {}

    def queued_rows(self) -> int:
        """Rows waiting for a model call (not counting the batches being run)."""
        return sum(queue.rows for queue in self._queues.values())

    async def run(self, servable: Servable, signature: str, inputs: Mapping[str, np.ndarray], rows: int) -> Outputs:
        """Run `inputs` (all with `rows` rows along dimension 0) as part of a batch; return its own rows."""
        if rows == 0 or rows > self.max_batch_size:
            return await self._runner(servable, signature, inputs)
        # Only arrays whose other dimensions agree can be concatenated along dimension 0. (Names and
        # dtypes are the signature's: the codec builds every input dict in the signature's order.)
        key = (id(servable), signature, *[v.shape[1:] for v in inputs.values()])
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(servable, signature)
        loop = asyncio.get_running_loop()
        task = _Task(inputs, rows, loop.time(), loop.create_future())
        queue.tasks.append(task)
        queue.rows += rows
        if queue.worker is None:
            queue.worker = asyncio.create_task(self._work(key, queue))
        return await task.future

    async def _work(self, key: Hashable, queue: _Queue) -> None:
        loop = asyncio.get_running_loop()
        try:
            while queue.tasks:
                deadline = queue.tasks[0].enqueued + self.timeout_s
                quiet = 0
                # Wait while requests keep coming (a new request needs two loop iterations: one reads its
                # socket, the next runs its handler), until the batch is full or its oldest request is due.
                while queue.rows < self.max_batch_size and quiet < 2 and loop.time() < deadline:
                    before = queue.rows
                    await asyncio.sleep(0)
                    quiet = quiet + 1 if queue.rows == before else 0
                batch, rows = [], 0
                while queue.tasks and rows + queue.tasks[0].rows <= self.max_batch_size:
                    task = queue.tasks.popleft()
                    batch.append(task)
                    rows += task.rows
                queue.rows -= rows
                await self._execute(queue.servable, queue.signature, batch)
        finally:
            del self._queues[key]
            for task in queue.tasks:  # only left when this worker was cancelled (server shutdown)
                if not task.future.done():
                    task.future.cancel()

    async def _execute(self, servable: Servable, signature: str, batch: list[_Task]) -> None:
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            inputs = {k: np.concatenate([t.inputs[k] for t in batch]) for k in batch[0].inputs}
        try:
            outputs = await self._runner(servable, signature, inputs)
        except BadRequestError as e:
            if len(batch) == 1:
                _settle(batch[0], error=e)
                return
            # Some request's data failed the whole batch: run the halves (concurrently) and recurse into
            # the failing ones, so k bad requests among n cost O(k log n) calls and good halves answer at once.
            mid = len(batch) // 2
            await asyncio.gather(
                self._execute(servable, signature, batch[:mid]), self._execute(servable, signature, batch[mid:])
            )
            return
        except Exception as e:
            for task in batch:
                _settle(task, error=e)
            return
        total = sum(t.rows for t in batch)
        if len(batch) > 1 and any(v.ndim == 0 or v.shape[0] != total for v in outputs.values()):
            # Outputs that are not per-row cannot be split back: run each request alone instead.
            await asyncio.gather(*(self._execute(servable, signature, [task]) for task in batch))
            return
        start = 0
        for task in batch:
            end = start + task.rows
            _settle(task, result=outputs if len(batch) == 1 else {k: v[start:end] for k, v in outputs.items()})
            start = end


def _settle(task: _Task, *, result: Outputs | None = None, error: BaseException | None = None) -> None:
    if task.future.done():  # the request was cancelled (client went away)
        return
    if error is not None:
        task.future.set_exception(error)
    else:
        task.future.set_result(result)
