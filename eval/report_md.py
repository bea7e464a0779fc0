"""Markdown for docs/results.md from the raw result files of `python -m eval.report`.

Everything here is computed from the numbers: the "what agrees / what does not" sentences compare measured
values (and the paper's, from eval/paper.py) when the page is generated, so they stay true when results change.
Hand-written notes live between STATIC_BEGIN and STATIC_END in docs/results.md and are carried over as is.
"""

from __future__ import annotations

import re
from statistics import mean

from eval import paper
from eval.ci import mean_ratio_ci, paired_mean_diff_ci, row_per_prompt
from eval.ci import verdict as side

STATIC_BEGIN = "<!-- static:begin (hand-written; eval/report.py keeps this block as is) -->"
STATIC_END = "<!-- static:end -->"
DATASET_ORDER = ("mtbench", "gsm_symbolic", "mathematics", "svamp_like", "sharegpt_code")
STRATEGY_ORDER = ("none", "single:math", "single:chat", "single:code", "single:mixed", "single:averaged",
                  "confidence", "entropy", "merged")
LABELS = {"single:averaged": "single:averaged (0.5 math + 0.5 chat)", "confidence": "confidence (math, chat)",
          "entropy": "entropy (math, chat)", "merged": "merged (math, chat)"}


ROW_STAGES = ("main", "three", "hass", "text", "sweep")  # report stages made of `taps eval` rows


def extract_static(text: str) -> str:
    """The hand-written block of an existing results.md (markers included), or ''."""
    m = re.search(re.escape(STATIC_BEGIN) + r".*?" + re.escape(STATIC_END), text, flags=re.S)
    return m.group(0) if m else ""


def _f(x, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _row(rows: list[dict], ds: str, strat: str, temp: float) -> dict | None:
    return next((r for r in rows if r["dataset"] == ds and r["strategy"] == strat and r["temperature"] == temp), None)


def _tau(rows, ds, strat, temp) -> float | None:
    r = _row(rows, ds, strat, temp)
    return r["acceptance_length"] if r else None


def _datasets(rows: list[dict]) -> list[str]:
    present = {r["dataset"] for r in rows}
    return [d for d in DATASET_ORDER if d in present] + sorted(present - set(DATASET_ORDER))


def _strategies(rows: list[dict]) -> list[str]:
    present = {r["strategy"] for r in rows}
    return [s for s in STRATEGY_ORDER if s in present] + sorted(present - set(STRATEGY_ORDER))


def _temps(rows: list[dict]) -> list[float]:
    return sorted({r["temperature"] for r in rows})


def _per_prompt(rows, ds, strat, temp):
    r = _row(rows, ds, strat, temp)
    return row_per_prompt(r) if r else None


def tau_ci(rows, ds, strat, temp) -> tuple[float, float] | None:
    r = _row(rows, ds, strat, temp)
    ci = (r or {}).get("acceptance_ci")
    return tuple(ci) if ci else None


def avg_ci(rows, strat, temp, datasets=None) -> tuple[float, float, float] | None:
    """(mean over the paper's sets, lo, hi) of a strategy's acceptance length, or None without per-prompt data."""
    present = [d for d in (datasets or paper.BENCHMARKS) if _row(rows, d, strat, temp) is not None]
    sets = [_per_prompt(rows, d, strat, temp) for d in present]
    return mean_ratio_ci(sets) if sets and None not in sets else None


def compare(rows, a: str, b: str, temp: float, datasets) -> tuple[float, float, float] | None:
    """(mean over `datasets` of tau(a) - tau(b), lo, hi), paired over the same prompts; None when a row or its
    per-prompt values are missing (result files written before intervals existed)."""
    pa = [_per_prompt(rows, d, a, temp) for d in datasets]
    pb = [_per_prompt(rows, d, b, temp) for d in datasets]
    if not datasets or any(x is None for x in pa + pb) or any(len(x[0]) != len(y[0]) for x, y in zip(pa, pb)):
        return None
    return paired_mean_diff_ci(pa, pb)


def claim(cmp, want: str = "higher", plain: bool | None = None) -> str:
    """'agrees' when the paired interval is on the side the paper's claim wants, 'does not agree' when it is on
    the other side, 'within noise' when it holds 0. Without an interval: plain (a bare comparison), marked."""
    if cmp is None:
        return ("agrees" if plain else "does not agree") + " (no interval)"
    v = side(*cmp)
    return "within noise" if v == "within noise" else ("agrees" if v == want else "does not agree")


def diff_text(cmp) -> str:
    if cmp is None:
        return ""
    if cmp[1] == float("-inf"):
        return f"difference {cmp[0]:+.2f}, one prompt: no interval"
    return f"difference {cmp[0]:+.2f} [{cmp[1]:+.2f}, {cmp[2]:+.2f}]"


def paper_avg(rows, strat, temp) -> float | None:
    """Mean acceptance length over the datasets that stand in for the paper's four benchmarks."""
    vals = [_tau(rows, d, strat, temp) for d in paper.BENCHMARKS]
    vals = [v for v in vals if v is not None]
    return mean(vals) if vals else None


def _hass_name(strat: str) -> str:
    """single:math_hass -> single:math (the paper variant a HASS drafter stands for)."""
    return strat.replace("_hass", "")


# ------------------------------------------------------------------------------------------------ tables
def acceptance_table(rows: list[dict], temp: float, method: str, label_of=None) -> str:
    """Table 1 analogue: acceptance length per dataset and strategy; the paper's value in parentheses."""
    dss = _datasets(rows)
    strats = [s for s in _strategies(rows) if s != "none"]
    has_avg = any(d in paper.BENCHMARKS for d in dss)
    head = ["drafter / strategy"] + dss + (["average (paper sets)"] if has_avg else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    best = {d: max((_tau(rows, d, s, temp) or 0) for s in strats) for d in dss}
    for s in strats:
        key = _hass_name(s) if method == "HASS" else s
        cells = []
        for d in dss:
            v = _tau(rows, d, s, temp)
            txt = _f(v)
            if v is not None and v == best[d] and len(strats) > 1:
                txt = f"**{txt}**"
            ci = tau_ci(rows, d, s, temp)
            if ci is not None and ci[0] == ci[0] and ci[0] != ci[1]:
                txt += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
            p = paper.table1(method, temp, key, d)
            cells.append(txt + (f" ({p:.2f})" if p is not None else ""))
        if has_avg:
            p = paper.table1(method, temp, key, "average")
            a = avg_ci(rows, s, temp)
            txt = _f(paper_avg(rows, s, temp)) + (f" [{a[1]:.2f}, {a[2]:.2f}]" if a and a[1] == a[1] and a[1] != a[2] else "")
            cells.append(txt + (f" ({p:.2f})" if p is not None else ""))
        label = (label_of or (lambda x: LABELS.get(x, x)))(s)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def routing_table(rows: list[dict], temp: float, names: tuple[str, str] = ("math", "chat")) -> str:
    """Table 3 analogue: share of steps won by each drafter; the paper's math share (per example) beside."""
    a, b = names
    strats = [s for s in ("confidence", "entropy", "merged") if any(r["strategy"] == s for r in rows)]
    head = ["dataset"] + [f"{s}: {a} / {b}" for s in strats] + ["paper confidence / entropy: math share"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for d in _datasets(rows):
        cells = []
        for s in strats:
            r = _row(rows, d, s, temp)
            sel = (r or {}).get("selected") or {}
            tot = sum(sel.values())
            cells.append(f"{100 * sel.get(a, 0) / tot:.0f}% / {100 * sel.get(b, 0) / tot:.0f}%" if tot else "n/a")
        pc, pe = paper.TABLE3_MATH_SHARE["confidence"].get(d), paper.TABLE3_MATH_SHARE["entropy"].get(d)
        cells.append(f"{pc:.1f}% / {pe:.1f}%" if pc is not None else "")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def math_share(rows, d, s, temp, name="math") -> float | None:
    r = _row(rows, d, s, temp)
    sel = (r or {}).get("selected") or {}
    tot = sum(sel.values())
    return 100 * sel.get(name, 0) / tot if tot else None


def conditional_depth(r: dict) -> list[float]:
    """P(accept depth d | reached depth d-1), the paper's per-depth acceptance rate (Tables 9-11)."""
    reach = [r["steps"]] + list(r["accepted_by_depth"])
    return [100 * reach[i + 1] / reach[i] if reach[i] else float("nan") for i in range(len(reach) - 1)]


def depth_table(rows: list[dict], temp: float) -> str:
    strats = [s for s in _strategies(rows) if s != "none"]
    depth = max((len(r["accepted_by_depth"]) for r in rows if r["strategy"] != "none"), default=0)
    head = ["strategy"] + [f"d={i + 1}" for i in range(depth)] + ["paper EAGLE-2 avg, d=1..5"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for s in strats:
        per = [conditional_depth(r) for r in rows
               if r["strategy"] == s and r["temperature"] == temp and r["dataset"] in paper.BENCHMARKS and r["steps"]]
        if not per:
            continue
        cells = []
        for i in range(depth):
            vals = [p[i] for p in per if i < len(p) and p[i] == p[i]]
            cells.append(f"{mean(vals):.0f}%" if vals else "n/a")
        pp = paper.TABLE9_AVG.get(s) if temp == 0.0 else None
        cells.append(" / ".join(f"{x:.0f}" for x in pp) if pp else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def entropy_table(rows: list[dict], temp: float = 0.0) -> str:
    strats = [s for s in _strategies(rows) if s != "none"]
    head = ["strategy", "dataset", "accepted: mean (n)", "rejected: mean (n)", "delta", "paper EAGLE-2 delta"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for s in strats:
        for d in _datasets(rows):
            r = _row(rows, d, s, temp)
            e = (r or {}).get("draft_entropy")
            if not e:
                continue
            acc, rej = e["accepted"], e["rejected"]
            delta = rej["mean"] - acc["mean"] if acc["mean"] is not None and rej["mean"] is not None else None
            p = paper.TABLE7.get(s, {}).get(d)
            lines.append(f"| {s} | {d} | {_f(acc['mean'])} ({acc['n']}) | {_f(rej['mean'])} ({rej['n']}) | "
                         f"{'n/a' if delta is None else f'{delta:+.2f}'} | {f'{p[1] - p[0]:+.2f}' if p else ''} |")
    return "\n".join(lines)


def speed_table(rows: list[dict], temp: float) -> str:
    """tokens/s and speedup vs `none` (same run, interleaved), and tree tokens verified per step."""
    dss = _datasets(rows)
    head = ["strategy"] + [f"{d}: tok/s (x none)" for d in dss] + ["tree tokens / step", "draft share of time"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for s in _strategies(rows):
        cells, sizes, dshare = [], [], []
        for d in dss:
            r = _row(rows, d, s, temp)
            if not r:
                cells.append("n/a")
                continue
            cells.append(f"{r['tokens_per_s']:.1f} (x{r['speedup_vs_none'] or 0:.2f})")
            sizes.append(r.get("draft_tokens_per_step", 0.0))
            if r.get("total_s"):
                dshare.append(r.get("draft_s", 0.0) / r["total_s"])
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {mean(sizes) if sizes else 0:.1f} | "
                     f"{100 * mean(dshare) if dshare else 0:.0f}% |")
    return "\n".join(lines)


def lambda_table(sweep: list[dict], reference: dict[str, dict[str, float]]) -> str:
    dss = [d for d in DATASET_ORDER if any(r["dataset"] == d for r in sweep)]
    lams = sorted({r["lambda"] for r in sweep})
    head = ["lambda (math weight)"] + dss
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for lam in lams:
        cells = [_f(next((r["acceptance_length"] for r in sweep if r["dataset"] == d and r["lambda"] == lam), None))
                 for d in dss]
        lines.append(f"| {lam:g} | " + " | ".join(cells) + " |")
    for name in sorted({n for d in dss for n in reference.get(d, {})}):
        lines.append(f"| {name} (math, chat) | " + " | ".join(_f(reference.get(d, {}).get(name)) for d in dss) + " |")
    return "\n".join(lines)


def peers_tables(peer_rows: list[dict], reference: str = "taps:none") -> str:
    dss = _datasets(peer_rows)
    systems = list(dict.fromkeys(r["system"] for r in peer_rows))
    head = ["system"] + [f"{d}: tok/s" for d in dss] + ["same tokens as taps:none"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for s in systems:
        rs = [next((r for r in peer_rows if r["system"] == s and r["dataset"] == d), None) for d in dss]
        same = sum(r["same_tokens_as_reference"] or 0 for r in rs if r)
        n = sum(r["n_prompts"] for r in rs if r)
        lines.append(f"| {s} | " + " | ".join(f"{r['tokens_per_s']:.1f}" if r else "n/a" for r in rs)
                     + f" | {same}/{n} |")
    taps = [s for s in systems if s.startswith("taps:")]
    others = [s for s in systems if not s.startswith("taps:")]
    if taps and others:
        lines += ["", "Ratios: TAPS tokens/s divided by the peer's tokens/s (above 1: TAPS faster).", ""]
        head = ["TAPS / peer"] + dss
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for t in taps:
            for o in others:
                cells = []
                for d in dss:
                    a = next((r for r in peer_rows if r["system"] == t and r["dataset"] == d), None)
                    b = next((r for r in peer_rows if r["system"] == o and r["dataset"] == d), None)
                    cells.append(f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}"
                                 if a and b and b["tokens_per_s"] else "n/a")
                lines.append(f"| {t} / {o} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ findings
def findings(rows: list[dict], sweep: list[dict] | None = None, method: str = "EAGLE-2") -> list[str]:
    """One sentence per paper claim we can test, each saying whether our numbers agree (computed)."""
    out = []
    for temp in _temps(rows):
        t = f"T={temp:g}"
        # RQ1: specialization, per dataset: the matched specialist minus the other one, paired over prompts
        counts = {"agrees": 0, "does not agree": 0, "within noise": 0}
        parts = []
        for d in _datasets(rows):
            m, c = _tau(rows, d, "single:math", temp), _tau(rows, d, "single:chat", temp)
            if m is None or c is None or d not in paper.BENCHMARKS:
                continue
            want_math = d in paper.MATH_SETS
            cmp = compare(rows, "single:math", "single:chat", temp, [d])
            word = claim(cmp, "higher" if want_math else "lower", (m > c) if want_math else (c > m))
            counts[word.split(" (")[0]] = counts.get(word.split(" (")[0], 0) + 1
            parts.append(f"{d} math {m:.2f} vs chat {c:.2f}: {word}" + (f", {diff_text(cmp)}" if cmp else ""))
        if parts:
            n = len(parts)
            verdict_s = ("agrees" if counts["agrees"] == n else "does not agree" if counts["does not agree"] == n
                         else "within noise" if counts["within noise"] == n else "partly agrees")
            out.append(f"**Specialization ({t}) {verdict_s}**: the matched specialist wins beyond the interval on "
                       f"{counts['agrees']} of {n} datasets, loses beyond it on {counts['does not agree']}, "
                       f"{counts['within noise']} within noise ({'; '.join(parts)}). Paper: math wins GSM8K/MATH-500, "
                       f"chat wins MT-Bench, SVAMP is mixed.")
        avg = {s: paper_avg(rows, s, temp) for s in _strategies(rows) if s != "none"}
        avg = {s: v for s, v in avg.items() if v is not None}
        sets = [d for d in paper.BENCHMARKS if _row(rows, d, "none", temp) is not None]

        def vs(a, b):
            return compare(rows, a, b, temp, sets)

        # RQ2: mixed
        if {"single:mixed", "single:math", "single:chat"} <= set(avg):
            parts = []
            for other in ("single:math", "single:chat"):
                cmp = vs("single:mixed", other)
                v = side(*cmp) if cmp else ("higher" if avg["single:mixed"] > avg[other] else "lower")
                parts.append(f"{v} than {other.split(':')[1]} {avg[other]:.2f}" + (f" ({diff_text(cmp)})" if cmp else ""))
            p = paper.table1(method, temp, "single:mixed", "average")
            out.append(f"**Mixed training ({t})**: mixed averages {avg['single:mixed']:.2f}: " + "; ".join(parts)
                       + f". Paper {method} mixed 35k+35k: {_f(p)} vs "
                       f"{_f(paper.table1(method, temp, 'single:math', 'average'))} / "
                       f"{_f(paper.table1(method, temp, 'single:chat', 'average'))}.")
        # RQ3: averaging is weakest
        if "single:averaged" in avg and {"single:math", "single:chat"} <= set(avg):
            weaker = min(("single:math", "single:chat"), key=avg.get)
            cmp = vs("single:averaged", weaker)
            word = claim(cmp, "lower", avg["single:averaged"] < avg[weaker])
            out.append(f"**Weight averaging is weakest ({t}) {word}**: averaged {avg['single:averaged']:.2f} vs the "
                       f"weaker parent {weaker} {avg[weaker]:.2f}" + (f", {diff_text(cmp)}" if cmp else "")
                       + f" (parents {avg['single:math']:.2f} / {avg['single:chat']:.2f}).")
        # RQ3: confidence over single; merged strongest composition
        singles = {s: v for s, v in avg.items() if s.startswith("single:") and s != "single:averaged"}
        if "confidence" in avg and singles:
            bs = max(singles, key=singles.get)
            cmp = vs("confidence", bs)
            out.append(f"**Confidence routing beats the best single drafter ({t}) "
                       f"{claim(cmp, 'higher', avg['confidence'] > singles[bs])}**: {avg['confidence']:.2f} vs {bs} "
                       f"{singles[bs]:.2f}" + (f", {diff_text(cmp)}" if cmp else "")
                       + f" (paper {method}: {_f(paper.table1(method, temp, 'confidence', 'average'))} vs "
                       f"{_f(paper.table1(method, temp, 'single:math', 'average'))}).")
        comps = {s: avg[s] for s in ("confidence", "entropy", "single:averaged") if s in avg}
        if "merged" in avg and comps:
            words, parts = [], []
            for k, v in comps.items():
                cmp = vs("merged", k)
                words.append(claim(cmp, "higher", avg["merged"] >= v))
                parts.append(f"{k} {v:.2f}" + (f" ({diff_text(cmp)})" if cmp else ""))
            word = ("agrees" if all(w.startswith("agrees") for w in words) else
                    "does not agree" if any(w.startswith("does not") for w in words) else "within noise")
            out.append(f"**Merged trees are the strongest composition ({t}) {word}**: merged {avg['merged']:.2f} vs "
                       + ", ".join(parts)
                       + (f"; best single {max(singles, key=singles.get)} {max(singles.values()):.2f}"
                          if singles else "") + ".")
        # RQ4: confidence vs entropy as routing signals
        if "confidence" in avg and "entropy" in avg:
            spread = {}
            for s in ("confidence", "entropy"):
                ms = [math_share(rows, d, s, temp) for d in paper.MATH_SETS]
                cs = [math_share(rows, d, s, temp) for d in paper.CHAT_SETS]
                ms, cs = [x for x in ms if x is not None], [x for x in cs if x is not None]
                spread[s] = mean(ms) - mean(cs) if ms and cs else None
            if None not in spread.values():
                cmp = vs("confidence", "entropy")
                word = "does not agree" if spread["confidence"] <= spread["entropy"] else \
                    claim(cmp, "higher", avg["confidence"] >= avg["entropy"])
                out.append(f"**Confidence is the better routing signal ({t}) {word}**: "
                           f"math share on math sets minus on MT-Bench is {spread['confidence']:.0f} points for "
                           f"confidence and {spread['entropy']:.0f} for entropy (paper: 75 vs 5); acceptance "
                           f"{avg['confidence']:.2f} vs {avg['entropy']:.2f}" + (f", {diff_text(cmp)}" if cmp else "")
                           + ".")
        # RQ4: entropy of rejected > accepted
        cells = [(r["draft_entropy"]["accepted"]["mean"], r["draft_entropy"]["rejected"]["mean"])
                 for r in rows if r["temperature"] == temp and r.get("draft_entropy")
                 and r["strategy"] != "single:averaged"]
        cells = [c for c in cells if None not in c]
        if cells:
            n_up = sum(rj > ac for ac, rj in cells)
            verdict = "agrees" if n_up == len(cells) else ("mostly agrees" if 2 * n_up > len(cells)
                                                          else "does not agree")
            out.append(f"**Rejected draft tokens have higher entropy ({t}) {verdict}**: in {n_up} of {len(cells)} "
                       f"(strategy, dataset) cells the mean draft entropy of rejected nodes exceeds that of accepted "
                       f"nodes (averaged checkpoint left out, as in the paper's figure).")
        # RQ5: acceptance declines with depth
        dec, tot = 0, 0
        for r in rows:
            if r["temperature"] != temp or r["strategy"] == "none" or not r.get("steps"):
                continue
            c = [x for x in conditional_depth(r) if x == x]
            if len(c) >= 2:
                tot += 1
                dec += c[0] > c[-1]
        if tot:
            out.append(f"**Acceptance declines with depth ({t}) {'agrees' if dec == tot else 'partly agrees'}**: "
                       f"the per-depth acceptance rate at the deepest reached depth is below depth 1 in {dec} of "
                       f"{tot} (strategy, dataset) rows.")
        # speed
        sp = [(r["strategy"], r["dataset"], r["speedup_vs_none"]) for r in rows
              if r["temperature"] == temp and r["strategy"] != "none" and r.get("speedup_vs_none") is not None]
        if sp:
            faster = [x for x in sp if x[2] > 1.0]
            best = max(sp, key=lambda x: x[2])
            out.append(f"**Wall clock ({t})**: {len(faster)} of {len(sp)} (strategy, dataset) rows run faster than "
                       f"`none` (best: {best[0]} on {best[1]}, x{best[2]:.2f}); the paper reports 1.4x-3.3x "
                       f"speedups on a GPU with an 8B verifier.")
    if sweep:
        for d in sorted({r["dataset"] for r in sweep}):
            pts = {r["lambda"]: r["acceptance_length"] for r in sweep if r["dataset"] == d}
            ends = [pts[k] for k in (0.0, 1.0) if k in pts]
            inner = {k: v for k, v in pts.items() if 0.0 < k < 1.0}
            merged = _tau(rows, d, "merged", 0.0)
            if ends and inner:
                below = all(v < max(ends) for v in inner.values())
                best_l = max(inner, key=inner.get)
                txt = (f"**Averaging sweep on {d} {'agrees' if below else 'does not agree'}**: "
                       f"{'every interior lambda stays' if below else 'not every interior lambda stays'} below the "
                       f"better endpoint "
                       f"({max(ends):.2f}); best interior lambda {best_l:g} gives {inner[best_l]:.2f}")
                if merged is not None:
                    txt += f", merged trees {merged:.2f}"
                out.append(txt + ".")
    return out
