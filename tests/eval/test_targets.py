"""eval.targets: issue 18's targets read from a report's rows."""

import json

from eval.targets import check, main


def _row(ds, strat, per_prompt, selected=None):
    tok, steps = sum(p[0] for p in per_prompt), sum(p[1] for p in per_prompt)
    return {"dataset": ds, "strategy": strat, "temperature": 0.0, "acceptance_length": tok / steps,
            "per_prompt": per_prompt, "selected": selected or {}}


def _rows(merged_gain: int):
    rows = []
    for ds in ("gsm_symbolic", "mathematics", "svamp_like", "mtbench"):
        mathy = ds != "mtbench"
        base = [[64 + i, 20 + i % 3] for i in range(8)]           # tau about 3.1
        weak = [[64 + i, 30 + i % 3] for i in range(8)]           # tau about 2.1
        rows.append(_row(ds, "single:math", base if mathy else weak))
        rows.append(_row(ds, "single:chat", weak if mathy else base))
        merged = [[t, s - merged_gain] for t, s in (base)]
        rows.append(_row(ds, "merged", merged))
        rows.append(_row(ds, "confidence", base, {"math": 85, "chat": 15} if mathy else {"math": 50, "chat": 50}))
    return rows


def test_targets_are_met_or_not_from_the_numbers():
    res = {t: met for t, _, met in check(_rows(merged_gain=2))}
    assert res["single:math on the math sets >= 3.0"] and res["single:chat on MT-Bench >= 2.2"]
    assert res["merged >= best single (single:chat) on mtbench"]  # fewer steps on every prompt: above
    assert res["confidence routes >= 80% of gsm_symbolic steps to math"]
    assert not res["confidence routes >= 60% of mtbench steps to chat"]  # 50%
    worse = {t: (m, met) for t, m, met in check(_rows(merged_gain=-3))}
    measured, met = worse["merged >= best single (single:math) on mathematics"]
    assert not met and "below beyond the interval" in measured


def test_cli_exit_status_says_whether_all_targets_are_met(tmp_path, capsys):
    p = tmp_path / "main.json"
    p.write_text(json.dumps({"rows": _rows(merged_gain=2)}))
    assert main([str(p)]) == 1  # the MT-Bench routing target is not met
    assert "NOT MET  confidence routes >= 60% of mtbench steps to chat: 50.0%" in capsys.readouterr().out
    p.write_text(json.dumps({"rows": []}))
    assert main([str(p)]) == 2
