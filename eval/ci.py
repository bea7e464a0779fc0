"""Confidence intervals for acceptance length, over prompts.

Acceptance length is a ratio: tokens emitted / verifier steps, pooled over the prompts of a set.
Its interval comes from the percentile bootstrap over prompts (the prompts are the sample; the
steps inside one prompt are not independent): resample prompts with replacement, recompute the
pooled ratio, take the 2.5th and 97.5th percentiles. A difference between two strategies (or two
drafters) on the same prompts is bootstrapped *paired*: the same resampled prompts for both, so the
prompt-to-prompt spread that both share cancels.

    lo, hi = ratio_ci([30, 41, 25], [20, 22, 19])           # per-prompt tokens, steps
    d, lo, hi = paired_diff_ci(([30, 41], [20, 22]), ([28, 40], [21, 25]))
    verdict(d, lo, hi)   # "higher" | "lower" | "within noise"

One prompt has no interval: ratio_ci gives (nan, nan) and a difference's interval is (-inf, inf),
so nothing measured on one prompt is called beyond noise. The resampling is seeded, so the same rows give the same intervals.
"""

from __future__ import annotations

import torch

RESAMPLES = 2000
LEVEL = 0.95


def _resample_index(n: int, resamples: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(n, (resamples, n), generator=g)


def _percentiles(x: torch.Tensor, level: float) -> tuple[float, float]:
    a = (1.0 - level) / 2
    q = torch.quantile(x, torch.tensor([a, 1.0 - a], dtype=x.dtype))
    return float(q[0]), float(q[1])


def ratio_ci(num, den, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of sum(num) / sum(den) over the paired per-prompt values."""
    num = torch.as_tensor(num, dtype=torch.float64)
    den = torch.as_tensor(den, dtype=torch.float64)
    if num.shape != den.shape or num.ndim != 1 or len(num) == 0:
        raise ValueError("num and den must be equal-length, non-empty 1-d sequences")
    if len(num) == 1:  # one prompt: no interval
        return float("nan"), float("nan")
    idx = _resample_index(len(num), resamples, seed)
    return _percentiles(num[idx].sum(1) / den[idx].sum(1).clamp(min=1e-12), level)


def paired_diff_ci(a, b, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
                   ) -> tuple[float, float, float]:
    """(ratio(a) - ratio(b), lo, hi): a and b are (num, den) over the same prompts in the same order."""
    an, ad = (torch.as_tensor(x, dtype=torch.float64) for x in a)
    bn, bd = (torch.as_tensor(x, dtype=torch.float64) for x in b)
    if not (an.shape == ad.shape == bn.shape == bd.shape) or an.ndim != 1 or len(an) == 0:
        raise ValueError("a and b must hold per-prompt values of the same prompts")
    d = float(an.sum() / ad.sum() - bn.sum() / bd.sum())
    if len(an) == 1:  # one prompt: no interval, so nothing is beyond it
        return d, float("-inf"), float("inf")
    idx = _resample_index(len(an), resamples, seed)
    diffs = an[idx].sum(1) / ad[idx].sum(1).clamp(min=1e-12) - bn[idx].sum(1) / bd[idx].sum(1).clamp(min=1e-12)
    lo, hi = _percentiles(diffs, level)
    return d, lo, hi


def _stack(sets, resamples: int, seed: int):
    """Per set: (num, den) tensors and resample indices (each set's prompts resampled on their own)."""
    out = []
    for j, (num, den) in enumerate(sets):
        num = torch.as_tensor(num, dtype=torch.float64)
        den = torch.as_tensor(den, dtype=torch.float64)
        if num.shape != den.shape or num.ndim != 1 or len(num) == 0:
            raise ValueError("every set needs equal-length, non-empty per-prompt values")
        out.append((num, den, _resample_index(len(num), resamples, seed + 7919 * j)))
    return out


def mean_ratio_ci(sets, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
                  ) -> tuple[float, float, float]:
    """(mean over sets of each set's pooled ratio, lo, hi): the average over several prompt sets (e.g. the
    paper's four benchmarks), every set's prompts resampled independently."""
    st = _stack(sets, resamples, seed)
    point = sum(float(n.sum() / d.sum()) for n, d, _ in st) / len(st)
    boot = sum(n[i].sum(1) / d[i].sum(1).clamp(min=1e-12) for n, d, i in st) / len(st)
    lo, hi = _percentiles(boot, level) if any(len(n) > 1 for n, _, _ in st) else (float("nan"), float("nan"))
    return point, lo, hi


def paired_mean_diff_ci(a_sets, b_sets, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
                        ) -> tuple[float, float, float]:
    """(mean over sets of ratio(a) - ratio(b), lo, hi), a and b measured on the same prompts of each set
    (the same resampled prompts for both)."""
    if len(a_sets) != len(b_sets) or not a_sets:
        raise ValueError("a and b need the same, non-empty list of sets")
    sa, sb = _stack(a_sets, resamples, seed), _stack(b_sets, resamples, seed)
    if any(na.shape != nb.shape for (na, _, _), (nb, _, _) in zip(sa, sb)):
        raise ValueError("a and b must hold per-prompt values of the same prompts")
    point = sum(float(na.sum() / da.sum() - nb.sum() / db.sum()) for (na, da, _), (nb, db, _) in zip(sa, sb)) / len(sa)
    boot = sum(na[i].sum(1) / da[i].sum(1).clamp(min=1e-12) - nb[i].sum(1) / db[i].sum(1).clamp(min=1e-12)
               for (na, da, i), (nb, db, _) in zip(sa, sb)) / len(sa)
    lo, hi = _percentiles(boot, level) if any(len(n) > 1 for n, _, _ in sa) else (float("-inf"), float("inf"))
    return point, lo, hi


def verdict(diff: float, lo: float, hi: float) -> str:
    """'higher' when the whole interval is above 0, 'lower' when below, else 'within noise'."""
    if lo > 0:
        return "higher"
    if hi < 0:
        return "lower"
    return "within noise"


def row_per_prompt(row: dict) -> tuple[list[int], list[int]] | None:
    """(tokens, steps) per prompt of a `taps eval` row, or None for rows written before they were kept."""
    pp = row.get("per_prompt")
    if not pp:
        return None
    return [p[0] for p in pp], [p[1] for p in pp]


__all__ = ["LEVEL", "RESAMPLES", "mean_ratio_ci", "paired_diff_ci", "paired_mean_diff_ci", "ratio_ci", "row_per_prompt",
           "verdict"]
