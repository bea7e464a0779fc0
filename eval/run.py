"""`taps eval`: acceptance length and speed of strategies over prompt files (CONTRACTS.md).

All strategies run in one process on one engine, prompts interleaved across strategies
(prompt 1 under every strategy, then prompt 2, ...), so that speed ratios are measured side by
side on a shared, noisy machine. `none` is always run: it is the speed baseline and, at
temperature 0, the oracle every other strategy's tokens must equal (`lossless_mismatches`).
"""

from __future__ import annotations

import json
import platform
import time
from collections import defaultdict
from pathlib import Path

from taps.config import ConfigError, SamplingConfig, TreeConfig


def load_prompts(path: str | Path, limit: int | None = None) -> list[dict]:
    """JSON lines with at least {"id", "prompt"}; optional "turns" and "dataset"."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"prompt file {path} does not exist")
    rows = []
    with open(path) as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{i}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("prompt"), str):
                raise ConfigError(f'{path}:{i}: each line needs "id" and a string "prompt"')
            turns = row.get("turns") or [row["prompt"]]
            if not all(isinstance(t, str) and t.strip() for t in turns):
                raise ConfigError(f'{path}:{i}: "turns" must be non-empty strings')
            rows.append({"id": row["id"], "dataset": row.get("dataset", path.stem), "turns": turns})
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise ConfigError(f"{path} holds no prompts")
    return rows


ENTROPY_BIN = 0.25  # nats per histogram bin of draft entropy (Figure 7 analogue)
ENTROPY_BINS = 40  # 0 .. 10 nats; larger values land in the last bin


class _EntropyHist:
    """Draft entropy of verified nodes by verdict (accepted / rejected / duplicate / unreached)."""

    def __init__(self):
        self.n: dict[str, int] = defaultdict(int)
        self.sum: dict[str, float] = defaultdict(float)
        self.hist: dict[str, list[int]] = defaultdict(lambda: [0] * ENTROPY_BINS)

    def add(self, records) -> None:
        for r in records:
            self.n[r.status] += 1
            self.sum[r.status] += r.entropy
            self.hist[r.status][min(ENTROPY_BINS - 1, max(0, int(r.entropy / ENTROPY_BIN)))] += 1

    def to_dict(self) -> dict:
        out = {"bin_width": ENTROPY_BIN}
        for k in ("accepted", "rejected", "duplicate", "unreached"):
            n = self.n.get(k, 0)
            out[k] = {"n": n, "mean": round(self.sum[k] / n, 4) if n else None, "hist": list(self.hist[k])}
        return out


class _Acc:
    """Per (dataset, strategy, temperature) sums."""

    def __init__(self):
        self.prompts = 0
        self.tokens = 0
        self.seconds = 0.0
        self.steps = 0
        self.step_tokens = 0
        self.draft_tokens = 0
        self.selected: dict[str, int] = defaultdict(int)
        self.by_depth: list[int] = []
        self.mismatches = 0
        self.draft_s = 0.0
        self.verify_s = 0.0
        self.entropy: _EntropyHist | None = None

    def add(self, stats, n_tokens: int, seconds: float) -> None:
        if stats.node_log is not None:
            self.entropy = self.entropy or _EntropyHist()
            self.entropy.add(stats.node_log)
        self.tokens += n_tokens
        self.seconds += seconds
        self.steps += stats.steps
        self.step_tokens += stats.step_tokens
        self.draft_tokens += stats.draft_tokens_verified
        self.draft_s += stats.draft_s
        self.verify_s += stats.verify_s
        for k, v in stats.selected.items():
            self.selected[k] += v
        if len(stats.accepted_by_depth) > len(self.by_depth):
            self.by_depth += [0] * (len(stats.accepted_by_depth) - len(self.by_depth))
        for i, v in enumerate(stats.accepted_by_depth):
            self.by_depth[i] += v


def run_eval(engine, verifier, prompt_sets: list[list[dict]], strategies, drafter_names: list[str],
             temperatures: list[float], max_new_tokens: int, seed: int = 0, progress: bool = True,
             record_entropy: bool = False, batch: int = 1) -> list[dict]:
    """Rows per CONTRACTS.md; with record_entropy, rows of drafting strategies also carry `draft_entropy`
    (histograms of draft entropy of accepted vs rejected tree nodes).

    Every row also keeps `per_prompt` ([emitted tokens, verifier steps] of each prompt, all turns) and
    `acceptance_ci` (95% percentile-bootstrap interval over prompts, eval.ci).

    batch 1 (default): one prompt at a time, interleaved across strategies; tokens/s is single-stream
    decode time. batch B > 1: B prompts of a set decode concurrently under one strategy (their
    verifier forwards batched, `TapsEngine.generate_many`; a multi-turn prompt's second turn starts
    after every first turn of its group); acceptance and tokens are what B = 1 gives (greedy output is
    lossless either way), tokens/s is the group's aggregate (`"batch": B` in the row)."""
    from tqdm import tqdm

    from eval.ci import ratio_ci
    from taps.compose import parse_strategy

    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    parsed = [parse_strategy(s, drafter_names, available=list(engine.drafters)) for s in strategies]
    total = sum(len(p) for p in prompt_sets) * len(parsed) * len(temperatures)
    bar = tqdm(total=total, desc="taps eval", unit="gen", disable=not progress)
    acc: dict[tuple, _Acc] = defaultdict(_Acc)
    per_prompt: dict[tuple, list[list[int]]] = defaultdict(list)
    order = []
    engine.record_nodes = record_entropy
    for temp in temperatures:
        for rows in prompt_sets:
            for g0 in range(0, len(rows), batch):
                group = list(enumerate(rows))[g0:g0 + batch]
                ref_tokens: dict[int, list] = {}
                for strat in parsed:  # interleaved: one group of prompts under every strategy
                    key = (group[0][1]["dataset"], strat.name, temp)
                    if key not in order:
                        order.append(key)
                    a = acc[key]
                    msgs = {k: [] for k, _ in group}
                    tokens = {k: [] for k, _ in group}
                    counts = {k: [0, 0] for k, _ in group}
                    for turn_i in range(max(len(row["turns"]) for _, row in group)):
                        live = [(k, row) for k, row in group if turn_i < len(row["turns"])]
                        reqs = []
                        for k, row in live:
                            msgs[k].append({"role": "user", "content": row["turns"][turn_i]})
                            reqs.append((verifier.encode_chat(msgs[k]), strat,
                                         SamplingConfig(temperature=temp, seed=seed + 1000 * k + turn_i),
                                         max_new_tokens))
                        t0 = time.perf_counter()
                        results = engine.generate_many(reqs)
                        wall = time.perf_counter() - t0
                        for (k, row), res in zip(live, results):
                            tokens[k].append(res.token_ids)
                            counts[k][0] += res.stats.step_tokens
                            counts[k][1] += res.stats.steps
                            msgs[k].append({"role": "assistant", "content": verifier.tokenizer.decode(
                                res.token_ids, skip_special_tokens=True)})
                            a.add(res.stats, len(res.token_ids), res.stats.total_s if batch == 1 else 0.0)
                        if batch > 1:
                            a.seconds += wall
                    for k, _ in group:
                        a.prompts += 1
                        per_prompt[key].append(counts[k])
                        if strat.kind == "none":
                            ref_tokens[k] = tokens[k]
                        elif temp == 0.0 and k in ref_tokens and tokens[k] != ref_tokens[k]:
                            a.mismatches += 1
                        bar.update(1)
    bar.close()
    engine.record_nodes = False
    rows_out = []
    for key in order:
        dataset, name, temp = key
        a = acc[key]
        base = acc[(dataset, "none", temp)]
        tps = a.tokens / a.seconds if a.seconds else 0.0
        base_tps = base.tokens / base.seconds if base.seconds else 0.0
        strat = next(s for s in parsed if s.name == name)
        pp = per_prompt[key]
        lo, hi = ratio_ci([p[0] for p in pp], [max(p[1], 1) for p in pp]) if a.steps else (0.0, 0.0)
        rows_out.append({
            "dataset": dataset, "strategy": name, "drafters": list(strat.drafters), "temperature": temp,
            "n_prompts": a.prompts, "acceptance_length": round(a.step_tokens / a.steps, 4) if a.steps else 0.0,
            "acceptance_ci": [round(lo, 4), round(hi, 4)] if lo == lo else None,  # None: one prompt
            "tokens_per_s": round(tps, 3), "speedup_vs_none": round(tps / base_tps, 4) if base_tps else None,
            "selected": dict(a.selected), "accepted_by_depth": a.by_depth,
            "lossless_mismatches": a.mismatches if temp == 0.0 else None,
            "n_tokens": a.tokens, "steps": a.steps,
            "draft_tokens_per_step": round(a.draft_tokens / a.steps, 3) if a.steps else 0.0,
            "draft_s": round(a.draft_s, 3), "verify_s": round(a.verify_s, 3), "total_s": round(a.seconds, 3),
            "batch": batch, "per_prompt": pp})
        if a.entropy is not None and strat.kind != "none":
            rows_out[-1]["draft_entropy"] = a.entropy.to_dict()
    return rows_out


def main(args) -> int:
    import torch

    from taps.runtime import build_engine, load_default_verifier, parse_drafter_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not strategies:
        raise ConfigError("--strategies is empty")
    if "none" not in strategies:
        strategies = ["none"] + strategies
    else:
        strategies = ["none"] + [s for s in strategies if s != "none"]
    temperatures = args.temperature or [0.0]
    prompt_sets = [load_prompts(p, args.limit) for p in args.prompts]
    entries = [d.strip() for d in (args.drafters or "math,chat").split(",") if d.strip()]
    names = [e.split("=", 1)[0] for e in entries]
    needed = list(entries)
    for s in strategies:
        if s.startswith("single:") and s.split(":", 1)[1] not in names:
            needed.append(s.split(":", 1)[1])
            names.append(s.split(":", 1)[1])
    tree = TreeConfig(depth=args.tree_depth, top_k=args.tree_top_k, total_tokens=args.tree_tokens)
    verifier = load_default_verifier(args.verifier, args.dtype)
    engine, info = build_engine(verifier, needed, tree, args.drafter_dir,
                                drafter_dtype=parse_drafter_dtype(getattr(args, "drafter_dtype", None)))
    drafter_names = [e.split("=", 1)[0] for e in entries]
    if getattr(args, "tree", "fixed") == "auto":  # per-strategy tree sizes from a start-up cost model
        from taps.adaptive import attach_auto_policies
        from taps.compose import parse_strategy

        attach_auto_policies(engine, verifier.model, [parse_strategy(s, drafter_names, available=list(engine.drafters))
                                                      for s in strategies])
    rows = run_eval(engine, verifier, prompt_sets, strategies, drafter_names, temperatures, args.max_new_tokens,
                    seed=args.seed, batch=getattr(args, "batch", 1))
    env = {"verifier": verifier.name, "dtype": args.dtype, "device": "cpu", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "tree": {"depth": tree.depth, "top_k": tree.top_k, "total_tokens": tree.total_tokens},
           "max_new_tokens": args.max_new_tokens,
           "drafters": {n: {k: d[k] for k in ("objective", "trained", "checkpoint", "draft_vocab_size")}
                        for n, d in info.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    for r in rows:
        ci = "[{:.2f}, {:.2f}]".format(*r["acceptance_ci"]) if r["acceptance_ci"] else "(1 prompt)"
        print(f"{r['dataset']:14s} T={r['temperature']:<3} {r['strategy']:14s} tau {r['acceptance_length']:5.2f} "
              f"{ci}  "
              f"{r['tokens_per_s']:7.2f} tok/s  x{r['speedup_vs_none'] or 0:5.2f}  mismatches {r['lossless_mismatches']}")
    bad = sum(r["lossless_mismatches"] or 0 for r in rows)
    return 1 if bad else 0
