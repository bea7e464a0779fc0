"""Report figures (matplotlib, Agg backend: no display needed). Each function takes result rows
(eval/run.py rows) and writes one PNG; all return the path written."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DRAFT_COLORS = {"single:math": "tab:blue", "single:chat": "tab:orange", "single:mixed": "tab:green",
                "single:averaged": "tab:gray", "confidence": "tab:purple", "entropy": "tab:brown",
                "merged": "tab:red", "single:code": "tab:olive"}


def _grid(n: int, ncols: int = 3):
    ncols = min(ncols, max(1, n))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def depth_plot(rows: list[dict], path: Path, title: str) -> Path:
    """Figure 8 analogue: share of steps whose accepted path reached depth d, per dataset and strategy,
    one panel per (dataset, temperature)."""
    rows = [r for r in rows if r["strategy"] != "none" and r.get("steps")]
    panels = sorted({(r["dataset"], r["temperature"]) for r in rows})
    fig, axes = _grid(max(1, len(panels)))
    for ax, (ds, temp) in zip(axes, panels):
        for r in rows:
            if (r["dataset"], r["temperature"]) != (ds, temp):
                continue
            ys = [v / r["steps"] for v in r["accepted_by_depth"]]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=3, label=r["strategy"],
                    color=DRAFT_COLORS.get(r["strategy"]))
        ax.set_title(f"{ds}, T={temp:g}", fontsize=9)
        ax.set_xlabel("draft depth d")
        ax.set_ylabel("steps reaching depth d / steps")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    if panels:
        axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def lambda_plot(sweep: list[dict], path: Path, reference: dict[str, dict[str, float]] | None = None) -> Path:
    """Figure 6 analogue: acceptance length vs lambda (lambda * math + (1 - lambda) * chat), one line per
    dataset; `reference` dataset -> {strategy: tau} draws dashed lines (e.g. merged, confidence)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    datasets = sorted({r["dataset"] for r in sweep})
    for i, ds in enumerate(datasets):
        pts = sorted((r["lambda"], r["acceptance_length"]) for r in sweep if r["dataset"] == ds)
        color = f"C{i}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{ds}: averaged", color=color)
        for j, (name, tau) in enumerate(sorted((reference or {}).get(ds, {}).items())):
            ax.axhline(tau, color=color, ls=["--", ":", "-."][j % 3], lw=1, label=f"{ds}: {name}")
    ax.set_xlabel("lambda (weight of the math drafter; 1 - lambda on chat)")
    ax.set_ylabel("acceptance length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Weight averaging sweep (T=0)", fontsize=10)
    return _save(fig, path)


def entropy_plot(rows: list[dict], path: Path, strategies: list[str], title: str) -> Path:
    """Figure 7 analogue: histogram of draft entropy of accepted vs rejected tree nodes, one panel per
    dataset, summed over `strategies` (rows with `draft_entropy`)."""
    rows = [r for r in rows if r.get("draft_entropy") and r["strategy"] in strategies]
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = _grid(max(1, len(datasets)))
    for ax, ds in zip(axes, datasets):
        width = None
        for status, color in (("accepted", "tab:green"), ("rejected", "tab:red")):
            hist = None
            for r in rows:
                if r["dataset"] != ds:
                    continue
                e = r["draft_entropy"]
                width = e["bin_width"]
                h = e[status]["hist"]
                hist = h if hist is None else [a + b for a, b in zip(hist, h)]
            if not hist or not sum(hist):
                continue
            total = sum(hist)
            xs = [i * width for i in range(len(hist))]
            ax.stairs([h / total for h in hist], xs + [len(hist) * width], color=color,
                      label=f"{status} (n={total})", fill=False, lw=1.5)
        ax.set_title(ds, fontsize=9)
        ax.set_xlabel("draft entropy (nats)")
        ax.set_ylabel("share of nodes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
