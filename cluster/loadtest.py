"""Bounded load test of a running server (loopback only): N concurrent streaming clients, a fixed
number of requests and a time cap. Reports p50/p99 latency, time to first token, tokens/s and
errors, and checks every response against the server's own `none` output (temperature 0).

    python -m cluster.loadtest --url http://127.0.0.1:8000 --streams 8 --requests 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from urllib.parse import urlparse

PROMPTS = ["What is 17*23?", "Write a haiku about the sea.", "Solve for x: 3x + 5 = 20.",
           "Explain what a hash table is.", "Name three prime numbers above 50.",
           "How many days are in a leap year?", "Give me a tip for learning Python.", "What is 12 squared?"]


async def one(client, url, headers, prompt, strategy, max_tokens, with_stats=False):
    """One streamed chat request; `strategy` None sends a plain OpenAI body (no `taps` field: the
    server's default), a dict is sent as the `taps` field. Returns latency, time to first token,
    inter-token gaps and the final stats."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    if strategy is not None:
        body["taps"] = strategy if isinstance(strategy, dict) else {"strategy": strategy}
    t0 = time.perf_counter()
    first = None
    final = None
    chunks = []  # (seconds since t0, characters) of every chunk with content
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            return {"error": r.status_code, "latency": time.perf_counter() - t0}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                return {"error": msg["error"]["code"], "latency": time.perf_counter() - t0}
            now = time.perf_counter() - t0
            if first is None:
                first = now
            if any((c.get("delta") or {}).get("content") or c.get("text") for c in msg.get("choices", [])):
                chunks.append(now)
            if "taps" in msg:
                final = msg["taps"]
    latency = time.perf_counter() - t0
    n = len(final["token_ids"])
    out = {"latency": latency, "ttft": first, "token_ids": final["token_ids"],
           "acceptance_length": final["acceptance_length"], "strategy_used": final.get("strategy"),
           # inter-token latency as vLLM / guidellm define it: (last token - first token) / (tokens - 1)
           "itl": (chunks[-1] - chunks[0]) / (n - 1) if len(chunks) > 1 and n > 1 else None}
    if with_stats:
        out["stats"] = final
    return out


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if not (host in ("localhost", "::1") or host.startswith("127.")):
        raise SystemExit("the load test only targets loopback addresses (127.0.0.0/8, localhost, ::1)")


async def references(client, url: str, headers: dict, max_tokens: int, prompts=PROMPTS) -> dict:
    """The server's own plain (`none`) output for every prompt, one request at a time."""
    return {p: (await one(client, url, headers, p, "none", max_tokens)).get("token_ids") for p in prompts}


async def drive(client, url: str, headers: dict, refs: dict, strategy: str, streams: int, requests: int,
                max_tokens: int, time_limit: float = 600) -> dict:
    """`requests` requests over `streams` concurrent streaming clients; every answer checked against refs."""
    prompts = list(refs)
    sem = asyncio.Semaphore(streams)
    deadline = time.perf_counter() + time_limit

    async def worker(i):
        if time.perf_counter() > deadline:
            return {"skipped": True}
        async with sem:
            p = prompts[i % len(prompts)]
            out = await one(client, url, headers, p, strategy, max_tokens)
            out["lossless"] = out.get("token_ids") == refs[p] if "token_ids" in out else None
            return out

    t0 = time.perf_counter()
    results = await asyncio.gather(*(worker(i) for i in range(requests)))
    wall = time.perf_counter() - t0
    done = [r for r in results if "token_ids" in r]
    lat = sorted(r["latency"] for r in done)
    q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan"))
    tokens = sum(len(r["token_ids"]) for r in done)
    return {"strategy": strategy, "streams": streams, "requests": len(done),
            "errors": sum(1 for r in results if "error" in r), "skipped": sum(1 for r in results if r.get("skipped")),
            "lossless_mismatches": sum(1 for r in done if not r["lossless"]),
            "p50_s": round(q(0.5), 3), "p99_s": round(q(0.99), 3),
            "ttft_p50_s": round(statistics.median(r["ttft"] for r in done), 3) if done else None,
            "itl_p50_ms": _median_ms([r["itl"] for r in done]), "itl_p99_ms": _q_ms([r["itl"] for r in done], 0.99),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 2), "wall_s": round(wall, 2),
            "acceptance_length": round(statistics.mean(r["acceptance_length"] for r in done), 3) if done else None}


def _median_ms(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(1000 * statistics.median(xs), 1) if xs else None


def _q_ms(xs, q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None


async def run(args) -> dict:
    import httpx

    check_loopback(args.url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=args.timeout) as client:
        refs = await references(client, args.url, headers, args.max_tokens)
        return await drive(client, args.url, headers, refs, args.strategy, args.streams, args.requests,
                           args.max_tokens, args.time_limit)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--strategy", default="merged")
    ap.add_argument("--time-limit", type=float, default=600, help="stop starting requests after this many seconds")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args(argv)
    report = asyncio.run(run(args))
    print(json.dumps(report))
    return 0 if report["errors"] == 0 and report["lossless_mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
