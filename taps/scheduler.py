"""Ticks: concurrent prefill / verify calls gathered into one verifier forward each.

`BatchingVerifier.submit(job)` queues a job and waits for its result. A ticker takes every job
that is waiting (continuous batching: no timer, a tick starts as soon as the previous one ends and
something waits), up to `max_rows` verifier rows, runs `VerifierRunner.step` once, and hands each
caller its own result. Jobs that arrive during a tick go into the next one.

Why a queue of our own and not Ray Serve's `@serve.batch`: the verifier is a Ray actor, not a
deployment; a tick mixes prefills and trees of any size, is bounded by rows rather than calls, and
must never wait for a batch to fill (a timer would add latency at 1 stream). The ticker is plain
asyncio, so the in-process engine and the verifier actor use the same one. A tick runs in the
event loop's own thread: callers that arrive meanwhile queue (in Ray's actor queue, or as
coroutines of the engine's loop) and join the next tick.

Gathering: after a tick, the ticker waits (at most half the last tick's time) until every request
the verifier holds has its next job waiting; then streams stay in step and share ticks instead of
alternating (each one's call arriving while the other's tick runs).

`Load` is what the tree policies see (taps.adaptive): how many requests share a tick and what a
tick costs (`c0 + c1 * rows`, from a start-up measurement scaled by the ticks observed since).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from taps.models.llama import padded
from taps.verify import PrefillJob, VerifierRunner, VerifyJob


@dataclass(frozen=True)
class Load:
    requests: float  # requests per tick (moving average); 1 when the verifier serves one stream
    c0: float  # seconds of a tick that do not depend on its rows
    c1: float  # seconds per verified row
    quantum: int = 1  # ticks are padded to a multiple of this many rows (taps.batching.row_quantum)

    def share(self, rows: int) -> float:
        """Verifier seconds one request's step of `rows` rows costs when `requests` share each tick.
        Alone, a step pays for its padded rows (a 1-row step already pays for `quantum`, so a tree
        that fits in them is free); shared, padding is spread over the tick and a row costs c1."""
        if self.requests < 1.5:
            return self.c0 + self.c1 * padded(rows, self.quantum)
        return self.c0 / self.requests + self.c1 * rows

    def to_dict(self) -> dict:
        return {"requests": self.requests, "c0": self.c0, "c1": self.c1, "quantum": self.quantum}


class LoadMeter:
    """Requests per tick and the tick cost line, from a start-up fit scaled by observed ticks."""

    def __init__(self, c0: float, c1: float, decay: float = 0.9):
        self.c0, self.c1, self.decay = c0, c1, decay
        self.requests = 1.0
        self.scale = 1.0  # observed tick seconds / predicted
        self.ticks = 0

    def observe(self, requests: int, rows: int, seconds: float) -> None:
        self.ticks += 1
        d = self.decay
        self.requests = d * self.requests + (1 - d) * requests
        predicted = self.c0 + self.c1 * rows
        if predicted > 0 and seconds > 0:
            self.scale = d * self.scale + (1 - d) * min(10.0, max(0.1, seconds / predicted))

    def load(self, quantum: int = 1) -> Load:
        return Load(self.requests, self.c0 * self.scale, self.c1 * self.scale, quantum)


def fit_tick_cost(runner: VerifierRunner, sizes=(16, 32, 64), repeats: int = 2) -> tuple[float, float]:
    """(c0, c1): least-squares line through one-request forward times at a few row counts (multiples
    of every row quantum, so the line is through padded rows)."""
    from taps.costmodel import measure_verifier

    table = measure_verifier(runner.model, sizes=sizes, repeats=repeats, prefix=32)
    xs, ys = table.sizes, table.seconds
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    c1 = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
    return max(1e-6, my - c1 * mx), c1


class BatchingVerifier:
    """Gathers concurrent jobs into ticks over one VerifierRunner (see the module docstring)."""

    def __init__(self, runner: VerifierRunner, max_rows: int = 1024, cost: tuple[float, float] | None = None,
                 gather_frac: float = 0.5):
        self.runner = runner
        self.max_rows = max_rows
        self.meter = LoadMeter(*(cost or fit_tick_cost(runner)))
        self._pending: list[tuple[PrefillJob | VerifyJob, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.ticks = 0
        self.max_batch = 0  # most requests seen in one tick
        self.gather_frac = gather_frac
        self._last_tick_s = 0.0

    def load(self) -> Load:
        return self.meter.load(self.runner.pad_to)

    async def submit(self, job: PrefillJob | VerifyJob):
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._ticker())
        fut = loop.create_future()
        self._pending.append((job, fut))
        self._wake.set()
        return await fut

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _take(self) -> list:
        """Jobs for the next tick: oldest first, up to max_rows rows (always at least one job)."""
        batch, rows, rest, seen = [], 0, [], set()
        for job, fut in self._pending:
            n = len(job.prompt_ids) if isinstance(job, PrefillJob) else job.tree.size
            if fut.done() or (batch and (rows + n > self.max_rows or job.request_id in seen)):
                if not fut.done():
                    rest.append((job, fut))
                continue
            batch.append((job, fut))
            seen.add(job.request_id)
            rows += n
        self._pending = rest
        return batch

    async def _settle(self, max_yields: int = 16) -> None:
        """Yield to the event loop until no more jobs arrive: callers woken by the last tick (and the
        tasks they spawn, e.g. drafting) get to submit their next job before the tick starts."""
        quiet = 0
        for _ in range(max_yields):
            n = len(self._pending)
            await asyncio.sleep(0)
            quiet = quiet + 1 if len(self._pending) == n else 0
            if quiet >= 3:
                return

    async def _gather(self) -> None:
        """Wait (at most `gather_frac` of the last tick's time) until every request the verifier holds
        has a job waiting. Without this, two streams ping-pong: each one's call arrives while the
        other's tick runs, and no tick ever holds both."""
        limit = self.gather_frac * self._last_tick_s
        if limit <= 0:
            return
        loop = asyncio.get_running_loop()
        t_end = loop.time() + limit
        while True:
            waiting = {j.request_id for j, f in self._pending if not f.done()}
            if len(waiting & self.runner.request_ids()) >= self.runner.active_requests:
                return
            left = t_end - loop.time()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=left)
            except asyncio.TimeoutError:
                return

    async def _ticker(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._settle()
                await self._gather()
                batch = self._take()
                if not batch:
                    continue
                jobs = [j for j, _ in batch]
                t0 = time.perf_counter()
                try:
                    results = self.runner.step(jobs)
                except Exception as e:  # noqa: BLE001 - the whole forward failed: every caller hears it
                    results = [e] * len(jobs)
                tick = self.runner.last_tick
                self._last_tick_s = time.perf_counter() - t0
                if tick is not None:
                    self.meter.observe(tick.requests, padded(tick.rows, self.runner.pad_to), self._last_tick_s)
                self.ticks += 1
                self.max_batch = max(self.max_batch, len(jobs))
                for (_, fut), res in zip(batch, results):
                    if fut.done():
                        continue
                    if isinstance(res, Exception):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
