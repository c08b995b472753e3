"""Fan-in of several sequences' output streams (n completions, or several prompts) into one, in arrival order.

Each sequence is one engine request (n=1 params, as `LLM.generate` makes for each child). `Fanout.start()` submits
every sequence and waits until each has produced its first output, so that a request the
engine refuses (bad input, full queue) fails before the HTTP response starts. Closing the fan-in, or cancelling the
task that iterates it (a client disconnect), cancels every sequence still running: it is aborted in the engine and
its KV pages are freed at once.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Sequence

from novallm_jax.engine.request import RequestOutput
from novallm_jax.llm import LLM
from novallm_jax.sampling_params import SamplingParams


class Fanout:
    """Runs `len(jobs)` sequences; iterate it for (index, RequestOutput) pairs until every one has finished."""

    def __init__(self, llm: LLM, jobs: Sequence[tuple[list[int], SamplingParams]]):
        self.llm, self.jobs = llm, list(jobs)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._first: list[RequestOutput | None] = [None] * len(self.jobs)
        self.final: list[RequestOutput | None] = [None] * len(self.jobs)

    async def _pump(self, index: int, ids: list[int], params: SamplingParams, started: asyncio.Future) -> None:
        try:
            async for out in self.llm.astream_outputs(ids, params):
                if not started.done():
                    started.set_result(out)
                else:
                    await self._queue.put((index, out))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # submission errors come out here, before any output
            if not started.done():
                started.set_exception(e)
            else:
                await self._queue.put((index, e))

    async def start(self) -> None:
        """Submits every sequence; raises the first submission error (after cancelling the others)."""
        loop = asyncio.get_running_loop()
        started = [loop.create_future() for _ in self.jobs]
        self._tasks = [
            asyncio.create_task(self._pump(i, ids, p, f)) for i, ((ids, p), f) in enumerate(zip(self.jobs, started))
        ]
        try:
            results = await asyncio.gather(*started, return_exceptions=True)
        except BaseException:  # cancelled while waiting (client gone)
            await self.aclose()
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.aclose()
            raise errors[0]
        self._first = list(results)

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        remaining = len(self.jobs)
        try:
            for i, out in enumerate(self._first):
                if out is not None:
                    if out.finished:
                        self.final[i] = out
                        remaining -= 1
                    yield i, out
            self._first = [None] * len(self.jobs)
            while remaining:
                i, out = await self._queue.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    self.final[i] = out
                    remaining -= 1
                yield i, out
        finally:
            await self.aclose()

    async def collect(self) -> list[RequestOutput]:
        """Runs every sequence to the end; their final outputs, in job order."""
        async for _ in self:
            pass
        return list(self.final)

    async def aclose(self) -> None:
        """Cancels every sequence still running (idempotent)."""
        pending = [t for t in self._tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
