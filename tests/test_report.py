"""The evaluation report (eval/report.py): the draft-node observer behind Figure 7, the page and figures
rendered from result files, and the peers module's HF baselines against our `none` path."""

from __future__ import annotations

import json

import pytest
import torch

from taps.compose import parse_strategy
from taps.config import SamplingConfig, TreeConfig
from taps.drafting import DrafterRunner
from taps.engine import TapsEngine
from taps.models.llama import causal_mask
from taps.stats import GenerationStats
from tests.support import random_drafter, random_llama, tiny_config
from taps.tree import DraftTree
from taps.verify import VerifierRunner

ACC_H, REJ_H = 0.5, 2.0  # entropies the oracle gives right and wrong tokens


def _greedy(model, seq, n):
    seq, out = list(seq), []
    with torch.no_grad():
        for _ in range(n):
            t = len(seq)
            h = model(torch.tensor([seq]), torch.arange(t)[None], None, causal_mask(t)[None, None])
            out.append(int(model.logits(h[0, -1]).argmax()))
            seq.append(out[-1])
    return out


class Oracle:
    """Drafts the verifier's greedy continuation as a chain, a wrong sibling before each right token;
    right tokens carry entropy ACC_H, wrong ones REJ_H."""

    def __init__(self, model, prompt, depth=3):
        self.model, self.prompt, self.depth, self.seen = model, list(prompt), depth, {}

    def draft(self, rid, tokens, hidden, tree, start=None):
        seq = self.seen.setdefault(rid, list(self.prompt[:1]))
        if start is not None:
            del seq[1 + start:]  # pairs from `start` on replace what was there
        seq.extend(tokens.tolist())
        toks, parents, depths, ents, prev = [seq[-1]], [-1], [0], [0.0], 0
        for d, tok in enumerate(_greedy(self.model, seq, self.depth), start=1):
            for t, e in (((tok + 1) % self.model.config.vocab_size, REJ_H), (tok, ACC_H)):
                toks.append(t)
                parents.append(prev)
                depths.append(d)
                ents.append(e)
            prev = len(toks) - 1
        n = len(toks)
        return DraftTree(torch.tensor(toks), torch.tensor(parents), torch.tensor(depths),
                         -torch.arange(n, dtype=torch.float32), torch.tensor(ents), torch.zeros(n, dtype=torch.long),
                         ("oracle",))

    def release(self, rid):
        self.seen.pop(rid, None)


@pytest.fixture(scope="module")
def tiny():
    return random_llama(tiny_config(vocab_size=97, hidden=32, layers=2), seed=1, dtype=torch.float64, scale=30.0)


def test_observer_marks_oracle_path_accepted_and_wrong_siblings_rejected(tiny):
    prompt = [3, 17, 42, 5]
    eng = TapsEngine(VerifierRunner(tiny, max_len=512), {"oracle": Oracle(tiny, prompt)},
                     TreeConfig(depth=3, top_k=2, total_tokens=8), [])
    strat = parse_strategy("single:oracle", [])
    assert eng.generate(prompt, strat, SamplingConfig(), 12).stats.node_log is None  # off by default
    eng.record_nodes = True
    res = eng.generate(prompt, strat, SamplingConfig(), 12)
    log = res.stats.node_log
    assert "node_log" not in res.stats.to_dict()  # the CONTRACTS stats object is unchanged
    assert res.token_ids == _greedy(tiny, prompt, 12)
    by = {s: [r for r in log if r.status == s] for s in ("accepted", "rejected", "unreached", "duplicate")}
    # every step accepts the whole chain (3) and refuses the 3 wrong siblings; nothing else is in the tree
    assert len(by["accepted"]) == len(by["rejected"]) == 3 * res.stats.steps
    assert not by["unreached"] and not by["duplicate"]
    assert {r.entropy for r in by["accepted"]} == {ACC_H} and {r.entropy for r in by["rejected"]} == {REJ_H}
    assert sorted({r.depth for r in by["accepted"]}) == [1, 2, 3] and {r.drafter for r in log} == {"oracle"}


def test_observer_statuses_on_a_hand_built_merged_tree():
    # root 0; drafter a: 1 (-> 2 -> 3), 4 ; drafter b: 5 (same token as 1), 6 (child of 5)
    tree = DraftTree(tokens=torch.tensor([9, 10, 11, 12, 13, 10, 14]), parents=torch.tensor([-1, 0, 1, 2, 0, 0, 5]),
                     depths=torch.tensor([0, 1, 2, 3, 1, 1, 2]), scores=torch.zeros(7),
                     entropies=torch.arange(7, dtype=torch.float32), source=torch.tensor([0, 0, 0, 0, 0, 1, 1]),
                     drafters=("a", "b"))
    st = GenerationStats("merged", ["a", "b"], node_log=[])
    st.observe_nodes(tree, [0, 1, 2])  # accepted 1, 2; 3 tried and refused
    got = {r.entropy: (r.status, r.drafter, r.depth) for r in st.node_log}
    assert got == {1.0: ("accepted", "a", 1), 2.0: ("accepted", "a", 2), 3.0: ("rejected", "a", 3),
                   4.0: ("rejected", "a", 1), 5.0: ("duplicate", "b", 1), 6.0: ("unreached", "b", 2)}


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
