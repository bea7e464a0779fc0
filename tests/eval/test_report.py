"""The evaluation report (eval/report.py): the page and figures rendered from result files, and the
peers module's HF baselines against our `none` path. The draft-node observer behind Figure 7 (in the
core) is tested in tests/taps/test_node_log.py."""

from __future__ import annotations

import json

import pytest
import torch

from taps.config import TreeConfig
from taps.drafting import DrafterRunner
from taps.engine import TapsEngine
from taps.verify import VerifierRunner
from tests.support import random_drafter


def _prompt_file(path, name, text):
    path.write_text(json.dumps({"id": f"{name}-0", "prompt": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random Llama in HF format with the real tokenizer, loaded as a verifier, plus drafters."""
    from taps.models.loading import load_verifier
    from tests.support import make_tiny_verifier_dir

    vdir = make_tiny_verifier_dir(tmp_path_factory.mktemp("tinyv") / "tiny", scale=20.0)
    verifier = load_verifier(str(vdir))
    drafters = {n: DrafterRunner(random_drafter(verifier.model, n, seed=i), name=n)
                for i, n in enumerate(("math", "chat", "mixed", "averaged"))}
    engine = TapsEngine(VerifierRunner(verifier.model, max_len=1024), drafters,
                        TreeConfig(depth=3, top_k=2, total_tokens=6), verifier.eos_token_ids)
    return vdir, verifier, engine


def test_report_page_and_figures_from_result_files(tiny_hf, tmp_path):
    from eval.report import MAIN_STRATEGIES, main
    from eval.report_md import STATIC_BEGIN, STATIC_END
    from eval.run import load_prompts, run_eval

    _, verifier, engine = tiny_hf
    sets = [load_prompts(_prompt_file(tmp_path / f"{n}.jsonl", n, t))
            for n, t in (("gsm_symbolic", "What is 2 plus 2?"), ("mtbench", "Say hello."))]
    rows = run_eval(engine, verifier, sets, list(MAIN_STRATEGIES), ["math", "chat"], [0.0], 4,
                    progress=False, record_entropy=True)
    rows += [{**r, "temperature": 1.0, "lossless_mismatches": None} for r in rows]  # a T=1 table, for free
    assert all(r["lossless_mismatches"] == 0 for r in rows if r["temperature"] == 0.0)
    ent = [r["draft_entropy"] for r in rows if r["strategy"] != "none"]
    assert ent and all(sum(e["accepted"]["hist"]) == e["accepted"]["n"] for e in ent)
    assert sum(e["accepted"]["n"] + e["rejected"]["n"] for e in ent) > 0
    assert all("draft_entropy" not in r for r in rows if r["strategy"] == "none")
    res = tmp_path / "out" / "results"
    res.mkdir(parents=True)
    env = {"verifier": "tiny", "dtype": "float32", "cpu": "x", "threads": 2, "tree": {"depth": 3},
           "drafters": {"math": {"objective": "eagle2"}}}
    (res / "main.json").write_text(json.dumps({"env": env, "rows": rows}))
    sweep = [{"dataset": d, "lambda": lam, "acceptance_length": 1.0 + lam * (d == "gsm_symbolic"),
              "tokens_per_s": 1.0} for d in ("gsm_symbolic", "mtbench") for lam in (0.0, 0.5, 1.0)]
    (res / "sweep.json").write_text(json.dumps({"env": env, "rows": [], "sweep": sweep}))
    peers = [{"dataset": d, "system": s, "n_prompts": 1, "n_tokens": 6, "seconds": 1.0, "tokens_per_s": tps,
              "ratio_vs_reference": 1.0, "same_tokens_as_reference": 1}
             for d in ("gsm_symbolic", "mtbench") for s, tps in (("taps:none", 6.0), ("hf_greedy", 3.0))]
    (res / "peers.json").write_text(json.dumps({"env": env, "rows": peers,
                                                "skipped": {"llama.cpp": "not installed"}}))
    math_rows = [r for r in rows if r["dataset"] == "gsm_symbolic" and r["temperature"] == 0.0
                 and r["strategy"] in ("none", "single:math")]
    text_rows = math_rows + [{**r, "strategy": "single:math_text", "acceptance_length": 9.87}
                             for r in math_rows if r["strategy"] == "single:math"]
    (res / "text.json").write_text(json.dumps({"env": env, "rows": text_rows}))
    (res / "meta.json").write_text(json.dumps({"limit": 1, "max_new_tokens": 6, "total_seconds": 60}))
    static = f"{STATIC_BEGIN}\nServing note that must survive.\n{STATIC_END}"
    (tmp_path / "out" / "results.md").write_text("# old page\n\n" + static + "\ntrailing junk\n")
    assert main(["--from-results", "--out-dir", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "results.md").read_text()
    for needle in ("Table 1 analogue", "Table 3 analogue", "Figure 8 analogue", "Figure 7 analogue",
                   "Figure 6 analogue", "## Wall clock", "What agrees with the paper", "n = 1 prompts per set",
                   "| single:math |", "hf_greedy", "llama.cpp skipped", "taps:none / hf_greedy | 2.00 | 2.00 |",
                   "Serving note that must survive.", "(5.04)", "Self-distilled vs dataset-text",
                   f"| gsm_symbolic | 0 | {math_rows[1]['acceptance_length']:.2f} | 9.87 |"):
        assert needle in page, needle
    assert "trailing junk" not in page and "### HASS" not in page  # no HASS results: no HASS section
    for png in ("fig8_depth_t0.png", "fig8_depth_t1.png", "fig7_entropy.png", "fig6_lambda.png"):
        data = (res / png).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 2000, png
        assert f"results/{png}" in page


@pytest.mark.slow
def test_peers_hf_greedy_and_prompt_lookup_equal_taps_none(tiny_hf):
    from eval.peers import hf_peers, run_peers, taps_peer

    vdir, verifier, engine = tiny_hf
    torch.set_num_threads(2)
    systems = [taps_peer(engine, "none", ["math", "chat"]), taps_peer(engine, "merged", ["math", "chat"]),
               taps_peer(engine, "merged@auto", ["math", "chat"]),
               taps_peer(engine, "confidence/chat+math@auto", ["math", "chat"])]
    with pytest.raises(ValueError, match="tree mode"):
        taps_peer(engine, "merged@big", ["math", "chat"])
    systems += hf_peers(vdir, verifier.eos_token_ids)
    prompts = [verifier.encode_chat([{"role": "user", "content": t}])
               for t in ("What is 3 plus 4?", "Write a haiku about the sea.")]
    rows = run_peers(systems, {"gsm": prompts}, 16, progress=False)
    by = {r["system"]: r for r in rows}
    assert set(by) == {"taps:none", "taps:merged", "taps:merged@auto", "taps:confidence/chat+math@auto", "hf_greedy",
                       "hf_prompt_lookup"}
    assert by["taps:confidence/chat+math@auto"]["drafters"] == ["chat", "math"]
    assert by["taps:merged@auto"]["tree"] == "auto" and by["taps:merged"]["tree"] == "fixed"
    assert "merged" not in engine.policies  # the adaptive system has an engine of its own
    for name, r in by.items():  # the same greedy tokens on every system, prompt by prompt
        assert r["same_tokens_as_reference"] == 2, name
        assert r["n_tokens"] > 2 and r["tokens_per_s"] > 0
    assert by["taps:none"]["ratio_vs_reference"] == 1.0


@pytest.mark.slow
def test_llama_cpp_peer_runs_on_the_shipped_gguf():
    pytest.importorskip("llama_cpp")
    from eval.peers import find_gguf, llama_cpp_peers

    gguf = find_gguf()
    if gguf is None:
        pytest.skip("no shipped GGUF")
    plain, lookup = llama_cpp_peers(gguf, [2], threads=2, n_ctx=256)
    prompt = [1, 9690, 198, 2683, 314, 216, 35, 1232, 216, 36, 47, 2, 198]
    a, b = plain.generate(prompt, 8), lookup.generate(prompt, 8)
    assert 1 <= len(a) <= 8 and a == b  # prompt lookup is lossless under greedy
