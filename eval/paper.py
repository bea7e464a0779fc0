"""Numbers from the TAPS paper (Task Aware Proposal Distributions for Speculative Sampling), Llama-3-8B-Instruct
verifier, for side-by-side tables. Copied from the paper text: Table 1 (acceptance length), Table 3 (routing
picks), Table 7 (EAGLE-2 draft entropy, T=0) and Table 9 (EAGLE-2 acceptance rate by depth, T=0)."""

from __future__ import annotations

# our dataset -> the paper's benchmark it stands in for
BENCHMARKS = {"mtbench": "MT-Bench", "gsm_symbolic": "GSM8K", "mathematics": "MATH-500", "svamp_like": "SVAMP"}
MATH_SETS = ("gsm_symbolic", "mathematics", "svamp_like")
CHAT_SETS = ("mtbench",)

# our strategy -> the paper's Table 1 variant (Mixed: the 35k+35k balanced mixture)
VARIANTS = {"single:math": "MathInstruct", "single:chat": "ShareGPT", "single:mixed": "Mixed 35k+35k",
            "single:averaged": "Averaged", "confidence": "Confidence Routed", "merged": "Merged Trees"}

# TABLE1[method][temperature][variant] = (MT-Bench, GSM8K, MATH-500, SVAMP, Average) acceptance length
_T1 = {
    "HASS": {
        0.0: {"MathInstruct": (2.90, 5.02, 5.35, 3.13, 4.10), "ShareGPT": (3.98, 4.09, 3.98, 4.44, 4.12),
              "Mixed 35k+35k": (3.92, 4.77, 5.02, 4.15, 4.47), "Averaged": (2.29, 2.80, 3.12, 2.13, 2.59),
              "Confidence Routed": (3.93, 5.01, 5.37, 4.89, 4.80), "Merged Trees": (4.05, 5.42, 5.65, 5.31, 5.11)},
        1.0: {"MathInstruct": (2.31, 4.75, 4.63, 2.46, 3.54), "ShareGPT": (3.50, 4.03, 3.61, 3.95, 3.77),
              "Mixed 35k+35k": (3.46, 4.66, 4.47, 4.57, 4.29), "Averaged": (2.10, 2.78, 2.90, 2.69, 2.62),
              "Confidence Routed": (3.51, 4.72, 4.55, 4.71, 4.37), "Merged Trees": (3.76, 5.21, 4.98, 5.05, 4.75)},
    },
    "EAGLE-2": {
        0.0: {"MathInstruct": (2.54, 5.04, 5.28, 4.81, 4.42), "ShareGPT": (3.57, 3.72, 3.81, 3.71, 3.70),
              "Mixed 35k+35k": (3.37, 4.12, 4.44, 4.16, 4.02), "Averaged": (2.07, 2.53, 2.57, 2.50, 2.42),
              "Confidence Routed": (3.63, 4.91, 5.25, 4.71, 4.63), "Merged Trees": (3.93, 5.32, 5.63, 5.25, 5.03)},
        1.0: {"MathInstruct": (2.43, 4.71, 4.61, 4.53, 4.07), "ShareGPT": (3.38, 3.72, 3.43, 3.65, 3.54),
              "Mixed 35k+35k": (3.10, 4.08, 4.02, 4.03, 3.81), "Averaged": (2.01, 2.49, 2.42, 2.45, 2.34),
              "Confidence Routed": (3.36, 4.65, 4.62, 4.46, 4.27), "Merged Trees": (3.55, 5.01, 4.79, 4.93, 4.57)},
    },
}
# same layout, wall-clock speedup (target-only time / speculative time)
_T1_SPEEDUP = {
    "EAGLE-2": {
        0.0: {"MathInstruct": (1.59, 2.90, 3.03, 2.76, 2.57), "ShareGPT": (2.24, 2.14, 2.19, 2.13, 2.17),
              "Mixed 35k+35k": (2.11, 2.37, 2.55, 2.39, 2.36), "Averaged": (1.30, 1.45, 1.48, 1.44, 1.42),
              "Confidence Routed": (1.92, 2.41, 2.58, 2.31, 2.30), "Merged Trees": (1.67, 2.12, 2.25, 2.10, 2.03)},
    },
}
_COLS = ("mtbench", "gsm_symbolic", "mathematics", "svamp_like", "average")


def table1(method: str, temperature: float, strategy: str, dataset: str) -> float | None:
    """Paper acceptance length for our (strategy, dataset) or None ('average' is the paper's Average column)."""
    variant = VARIANTS.get(strategy)
    row = _T1.get(method, {}).get(float(temperature), {}).get(variant) if variant else None
    return row[_COLS.index(dataset)] if row and dataset in _COLS else None


def table1_speedup(strategy: str, dataset: str, temperature: float = 0.0) -> float | None:
    variant = VARIANTS.get(strategy)
    row = _T1_SPEEDUP["EAGLE-2"].get(float(temperature), {}).get(variant) if variant else None
    return row[_COLS.index(dataset)] if row and dataset in _COLS else None


# Table 3 (EAGLE-2): share of examples routed to the MathInstruct drafter
TABLE3_MATH_SHARE = {"confidence": {"mtbench": 18.8, "gsm_symbolic": 90.8, "mathematics": 97.0, "svamp_like": 93.0},
                     "entropy": {"mtbench": 52.5, "gsm_symbolic": 54.6, "mathematics": 62.4, "svamp_like": 53.0}}

# Table 7 (EAGLE-2, T=0): mean draft entropy (accepted, rejected)
TABLE7 = {
    "single:math": {"gsm_symbolic": (0.5284, 1.0756), "mathematics": (0.4567, 0.8555),
                    "mtbench": (2.3867, 3.8516), "svamp_like": (0.5928, 1.1607)},
    "single:mixed": {"gsm_symbolic": (0.7074, 1.2153), "mathematics": (0.6302, 1.0409),
                     "mtbench": (1.1839, 1.8407), "svamp_like": (0.8162, 1.3367)},
    "single:chat": {"gsm_symbolic": (0.7434, 1.0952), "mathematics": (0.8926, 1.2558),
                    "mtbench": (1.0404, 1.6292), "svamp_like": (0.8554, 1.2391)},
    "single:averaged": {"gsm_symbolic": (8.0257, 9.2397), "mathematics": (8.8405, 9.8344),
                        "mtbench": (8.5128, 9.4886), "svamp_like": (7.8233, 9.0891)},
}

# Table 9 (EAGLE-2, T=0): acceptance rate at depth 1..5, averaged over the four benchmarks (the "Avg" column)
TABLE9_AVG = {"single:math": (90.2, 80.2, 76.1, 72.9, 73.5), "single:chat": (91.4, 75.7, 67.1, 63.6, 60.8),
              "single:mixed": (93.7, 80.8, 71.8, 65.8, 63.2), "single:averaged": (84.0, 56.9, 27.3, 24.3, 30.0)}
