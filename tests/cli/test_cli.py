"""The `taps` command line (cli/): one clear line and exit 2 for errors a user can fix, the
`generate --json` contract, and the options each subcommand takes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli.main import build_parser
from tests.support import make_tiny_verifier_dir


@pytest.mark.slow
def test_cli_bad_input_is_one_clear_line(tmp_path):
    vdir = make_tiny_verifier_dir(tmp_path / "tiny")
    cases = [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "hi", "--strategy", "bogus"], "unknown strategy 'bogus'"),
        (["--prompt", "hi " * 3000, "--max-len", "256"], "exceeds the context window"),
        (["--prompt", "hi", "--strategy", "single:math", "--drafters", f"math={tmp_path}/nope"], "drafter.json"),
    ]
    for extra, msg in cases:
        p = subprocess.run([sys.executable, "-m", "cli", "generate", "--verifier", str(vdir),
                            "--drafter-dir", str(tmp_path / "no-drafters"), *extra],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 2, (extra, p.stderr[-2000:])
        assert msg in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_cli_generate_json_contract(tmp_path):
    vdir = make_tiny_verifier_dir(tmp_path / "tiny")
    p = subprocess.run([sys.executable, "-m", "cli", "generate", "--verifier", str(vdir),
                        "--drafter-dir", str(tmp_path / "no-drafters"), "--prompt",
                        "What is 17*23?", "--strategy", "merged", "--drafters", "math,chat", "--json",
                        "--max-new-tokens", "12"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert set(out) >= {"text", "token_ids", "stats"}
    assert out["stats"]["strategy"] == "merged" and out["stats"]["drafters"] == ["math", "chat"]
    assert len(out["token_ids"]) == out["stats"]["new_tokens"] <= 12
    assert out["drafters"]["math"]["trained"] is False  # random-init drafters are labelled


def test_cli_accepts_tree_auto():
    args = build_parser().parse_args(["generate", "--prompt", "hi", "--tree", "auto"])
    assert args.tree == "auto"
    args = build_parser().parse_args(["eval", "--prompts", "x.jsonl", "--strategies", "merged", "--out", "o.json"])
    assert args.tree == "fixed"
