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

Threads (`ThreadTuner`, CPU): how many torch threads a tick gets is measured, not assumed. The
verifier shares its cores with the drafters, the front end and the HTTP proxy; whether a second
thread helps a tick or stalls at its barriers behind a busy neighbour depends on the load. Each tick
runs under one of the candidate counts, mostly the one whose ticks have been fastest lately.

`Load` is what the tree policies see (taps.adaptive): how many requests share a tick and what a
tick costs (`c0 + c1 * rows`, from a start-up measurement scaled by the ticks observed since).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import torch

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

    def predict(self, rows: int) -> float:
        """Seconds of a tick of `rows` (padded) rows on the start-up cost line, unscaled."""
        return self.c0 + self.c1 * rows

    def observe(self, requests: int, rows: int, seconds: float) -> None:
        self.ticks += 1
        d = self.decay
        self.requests = d * self.requests + (1 - d) * requests
        predicted = self.predict(rows)
        if predicted > 0 and seconds > 0:
            self.scale = d * self.scale + (1 - d) * min(10.0, max(0.1, seconds / predicted))

    def load(self, quantum: int = 1) -> Load:
        return Load(self.requests, self.c0 * self.scale, self.c1 * self.scale, quantum)


class ThreadTuner:
    """The torch thread count for each tick, learnt from the ticks themselves: per size class of the
    tick (1 row, 2-4, 5-16, 17-64, more), the count whose recent ticks ran fastest against the cost
    line's prediction (the median of the last `window` ratios, so ticks of different sizes within a
    class compare fairly and one preempted tick does not decide). A count is measured in runs of
    `run` ticks, and the first `settle` ticks after a switch are not scored: threads that slept
    while the other count served are slow to wake, and would make a rarely tried count look worse
    than it is. Every count is measured first; then the best serves, with `explore` of the
    decisions starting a run of another (about 4% of ticks) so that a change in load is noticed."""

    BOUNDS = (1, 4, 16, 64)
    LABELS = ("1", "2-4", "5-16", "17-64", ">64")

    def __init__(self, options, explore: float = 0.005, run: int = 8, settle: int = 2, window: int = 15,
                 seed: int = 0):
        self.options = sorted({int(n) for n in options if int(n) >= 1})
        if not self.options:
            raise ValueError("ThreadTuner needs at least one thread count")
        self.explore, self.run, self.settle, self.window = explore, run, settle, window
        self.ratios: dict[tuple[int, int], list[float]] = {}  # (size class, threads) -> recent ratios
        self.ticks: dict[tuple[int, int], int] = {}  # scored ticks
        self.current, self._left, self._since_switch = self.options[-1], 0, settle
        self._rng = random.Random(seed)

    def size_class(self, rows: int) -> int:
        return sum(rows > b for b in self.BOUNDS)

    def score(self, c: int, n: int) -> float:
        r = sorted(self.ratios[(c, n)])
        return r[len(r) // 2]

    def choose(self, rows: int) -> int:
        if self._left > 0:
            self._left -= 1
            return self.current
        c = self.size_class(rows)
        fresh = [n for n in self.options if self.ticks.get((c, n), 0) < 3]
        if fresh:
            target = self.current if self.current in fresh else min(fresh, key=lambda n: self.ticks.get((c, n), 0))
            run = self.run
        else:
            target, run = min(self.options, key=lambda n: self.score(c, n)), 1
            if len(self.options) > 1 and self._rng.random() < self.explore:
                target, run = self._rng.choice([n for n in self.options if n != target]), self.run
        if target != self.current:
            self.current, self._since_switch = target, 0
        self._left = run - 1
        return self.current

    def observe(self, rows: int, threads: int, ratio: float) -> None:
        """`ratio`: the tick's seconds over what the cost line predicts for its rows."""
        self._since_switch += 1
        if self._since_switch <= self.settle:
            return
        key = (self.size_class(rows), threads)
        self.ticks[key] = self.ticks.get(key, 0) + 1
        self.ratios[key] = (self.ratios.get(key, []) + [ratio])[-self.window:]

    def summary(self) -> dict:
        """{size class: {threads: [scored ticks, median ratio]}} (ratio: tick seconds / predicted)."""
        out: dict = {}
        for (c, n), t in sorted(self.ticks.items()):
            out.setdefault(self.LABELS[c], {})[n] = [t, round(self.score(c, n), 3)]
        return out


def fit_tick_cost(runner: VerifierRunner, sizes=(1, 2, 4, 8, 16), repeats: int = 3) -> tuple[float, float]:
    """(c0, c1): least-squares line through one-request forward times at the row counts draft trees
    have (1 to 16). Fitted at 16-64 rows instead, a quantized engine's line ran through zero (its
    small forwards are bound by reading the weights, not by rows), and a tick of 2 rows looked twice
    the price of 1: the tree policies never drafted."""
    from taps.costmodel import measure_verifier

    table = measure_verifier(runner.model, sizes=sizes, repeats=repeats, prefix=32)
    xs, ys = table.sizes, table.seconds
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    c1 = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
    return max(1e-6, my - c1 * mx), c1


def job_rows(job: PrefillJob | VerifyJob) -> int:
    return len(job.prompt_ids) if isinstance(job, PrefillJob) else job.tree.size


class BatchingVerifier:
    """Gathers concurrent jobs into ticks over one VerifierRunner (see the module docstring)."""

    def __init__(self, runner: VerifierRunner, max_rows: int = 1024, cost: tuple[float, float] | None = None,
                 gather_frac: float = 0.5, threads: ThreadTuner | None = None):
        self.runner = runner
        self.threads = threads  # None: ticks run under the process's torch thread count
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
            n = job_rows(job)
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
                n_threads = None
                if self.threads is not None:
                    n_threads = self.threads.choose(sum(job_rows(j) for j in jobs))
                    if n_threads != torch.get_num_threads():
                        torch.set_num_threads(n_threads)
                t0 = time.perf_counter()
                try:
                    results = self.runner.step(jobs)
                except Exception as e:  # noqa: BLE001 - the whole forward failed: every caller hears it
                    results = [e] * len(jobs)
                tick = self.runner.last_tick
                self._last_tick_s = time.perf_counter() - t0
                if tick is not None:
                    rows = padded(tick.rows, self.runner.pad_to)
                    if n_threads is not None:  # against the start-up cost line (fixed, whatever the threads)
                        self.threads.observe(tick.rows, n_threads, self._last_tick_s / self.meter.predict(rows))
                    self.meter.observe(tick.requests, rows, self._last_tick_s)
                self.ticks += 1
                self.max_batch = max(self.max_batch, len(jobs))
                for (_, fut), res in zip(batch, results):
                    if fut.done():
                        continue
                    if isinstance(res, Exception):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
