"""The committed prompt sets (eval/prompts): the contract's shape, small, and exactly what
eval/build_prompts.py builds."""

from __future__ import annotations

import json
import re
from pathlib import Path

from eval import build_prompts
from eval.build_prompts import svamp_like

PROMPTS = Path(__file__).resolve().parents[2] / "eval" / "prompts"


def _rows(name: str) -> list[dict]:
    with open(PROMPTS / f"{name}.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_prompt_files_follow_the_contract_and_are_small():
    expected = {"mtbench": 80, "gsm_symbolic": 50, "mathematics": 50, "svamp_like": 50,
                "sharegpt_chat": 50, "sharegpt_code": 50}
    for name, n in expected.items():
        path = PROMPTS / f"{name}.jsonl"
        assert path.stat().st_size < 200_000
        rows = _rows(name)
        assert len(rows) == n and len({r["id"] for r in rows}) == n
        assert all(isinstance(r["prompt"], str) and r["prompt"].strip() for r in rows)
    mt = _rows("mtbench")
    assert all(len(r["turns"]) == 2 and r["prompt"] == r["turns"][0] for r in mt)


def test_prompt_files_are_what_the_script_builds():
    built = build_prompts.build_all(50)
    for name, rows in built.items():
        if name == "mathematics":  # variable letters depend on PYTHONHASHSEED (the script pins it)
            assert [(r["id"], r["answer"]) for r in rows] == [(r["id"], r["answer"]) for r in _rows(name)]
        else:
            assert rows == _rows(name), name


def test_svamp_like_answers_are_right():
    rows = svamp_like(50)
    assert len({r["template"] for r in rows}) >= 10
    r = next(r for r in rows if r["template"] == "groups")
    x, y = map(int, re.findall(r"\d+", r["prompt"]))
    assert int(r["answer"]) == x * y
