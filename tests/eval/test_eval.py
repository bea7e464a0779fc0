"""`taps eval`: the results file has the CONTRACTS.md shape, strategies are interleaved, lossless."""

import json
import subprocess
import sys

import pytest

from eval.run import load_prompts
from taps.config import ConfigError


def _prompts(path, n, name):
    with open(path, "w") as fh:
        for i in range(n):
            row = {"id": f"{name}-{i}", "prompt": f"What is {i} plus {i}?"}
            if i == 0:
                row["turns"] = [row["prompt"], "And times two?"]
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.mark.slow
def test_eval_results_file_matches_the_contract(tmp_path):
    from tests.support import make_tiny_verifier_dir

    vdir = make_tiny_verifier_dir(tmp_path / "tiny")
    a = _prompts(tmp_path / "gsm.jsonl", 2, "g")
    b = _prompts(tmp_path / "chat.jsonl", 2, "c")
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "cli", "eval", "--verifier", str(vdir), "--drafter-dir",
                        str(tmp_path / "none"), "--prompts", str(a), "--prompts", str(b), "--strategies",
                        "single:math,confidence,merged", "--drafters", "math,chat", "--max-new-tokens", "8",
                        "--temperature", "0", "--temperature", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {"verifier", "device", "torch", "threads"} <= set(res["env"])
    rows = res["rows"]
    assert {(r["dataset"], r["strategy"], r["temperature"]) for r in rows} == {
        (d, s, t) for d in ("gsm", "chat") for s in ("none", "single:math", "confidence", "merged") for t in (0.0, 1.0)}
    for r in rows:
        assert {"dataset", "strategy", "drafters", "temperature", "n_prompts", "acceptance_length", "tokens_per_s",
                "speedup_vs_none", "selected", "accepted_by_depth", "lossless_mismatches"} <= set(r)
        assert r["n_prompts"] == 2 and r["tokens_per_s"] > 0
        if r["temperature"] == 0.0:
            assert r["lossless_mismatches"] == 0
        if r["strategy"] == "none":
            assert r["speedup_vs_none"] == 1.0
    merged = next(r for r in rows if r["strategy"] == "merged")
    assert merged["drafters"] == ["math", "chat"]


def test_bad_prompt_files_are_clear_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "prompt": "ok"}\n{not json}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "noprompt.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(ConfigError, match='"prompt"'):
        load_prompts(tmp_path / "noprompt.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    rows = load_prompts("eval/prompts/mtbench.jsonl", limit=3)
    assert len(rows) == 3 and len(rows[0]["turns"]) == 2 and rows[0]["dataset"] == "mtbench"
