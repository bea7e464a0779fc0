"""Losslessness and cache correctness of the core engine, with oracles:
plain greedy decoding, Hugging Face logits, standalone tree verification, exact distributions."""

from __future__ import annotations

import pytest
import torch

from taps.compose import merge_trees, parse_strategy
from taps.config import ConfigError, SamplingConfig, TreeConfig
from taps.drafting import DrafterRunner
from taps.engine import TapsEngine
from taps.models.drafter import DrafterMismatchError
from taps.models.llama import causal_mask
from tests.support import greedy_reference, random_drafter, random_llama, tiny_config, token_paths
from taps.tree import DraftTree
from taps.batching import VerifyBatch, accept_greedy_batch, gumbel_targets
from taps.verify import ContextOverflowError, VerifierRunner

STRATEGIES = ["none", "single:a", "single:b", "confidence", "entropy", "merged"]


make_drafter = random_drafter


class OracleRunner:
    """A drafter that proposes the verifier's own greedy continuation as a chain, with a wrong
    sibling placed before the right token at every depth (so sibling order is exercised)."""

    def __init__(self, model, prompt, name="oracle", depth=4, wrong_first=True):
        self.model, self.prompt, self.name, self.depth, self.wrong_first = model, list(prompt), name, depth, wrong_first
        self.seen = {}

    def draft(self, rid, tokens, hidden, tree, start=None):
        seq = self.seen.setdefault(rid, list(self.prompt[:1]))
        if start is not None:
            del seq[1 + start:]  # pairs from `start` on replace what was there
        seq.extend(tokens.tolist())
        cont = greedy_reference(self.model, seq, min(self.depth, tree.depth))
        toks, parents, depths = [seq[-1]], [-1], [0]
        prev = 0
        for d, tok in enumerate(cont, start=1):
            if self.wrong_first:
                toks.append((tok + 1) % self.model.config.vocab_size)
                parents.append(prev)
                depths.append(d)
            toks.append(tok)
            parents.append(prev)
            depths.append(d)
            prev = len(toks) - 1
        n = len(toks)
        return DraftTree(torch.tensor(toks), torch.tensor(parents), torch.tensor(depths),
                         -torch.arange(n, dtype=torch.float32) * 0.1, torch.ones(n),
                         torch.zeros(n, dtype=torch.long), (self.name,))

    def release(self, rid):
        self.seen.pop(rid, None)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = random_llama(tiny_config(vocab_size=97, hidden=32, layers=2), seed=1, dtype=torch.float64, scale=30.0)
    return model


def engine_for(model, drafters, tree=TreeConfig(depth=4, top_k=3, total_tokens=12), eos=()):
    return TapsEngine(VerifierRunner(model, max_len=512), drafters, tree, list(eos))


PROMPTS = [[3, 17, 42, 5], [60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11]]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_greedy_lossless_random_drafters(tiny, strategy):
    drafters = {"a": DrafterRunner(make_drafter(tiny, "a", 1)), "b": DrafterRunner(make_drafter(tiny, "b", 2))}
    eng = engine_for(tiny, drafters)
    for prompt in PROMPTS:
        ref = greedy_reference(tiny, prompt, 24)
        res = eng.generate(prompt, parse_strategy(strategy, ["a", "b"]), SamplingConfig(), 24)
        assert res.token_ids == ref, (strategy, prompt)
        assert res.stats.new_tokens == 24
        if strategy != "none":
            assert res.stats.acceptance_length >= 1.0
        assert drafters["a"].active_requests == 0  # state released


@pytest.mark.parametrize("strategy", ["single:a", "confidence", "merged"])
def test_greedy_lossless_two_layer_drafters(tiny, strategy):
    """Two-layer heads (issue 18's step past the paper), beside a one-layer head: output == greedy."""
    drafters = {"a": DrafterRunner(make_drafter(tiny, "a", 3, num_layers=2)),
                "b": DrafterRunner(make_drafter(tiny, "b", 2))}
    eng = engine_for(tiny, drafters)
    for prompt in PROMPTS:
        res = eng.generate(prompt, parse_strategy(strategy, ["a", "b"]), SamplingConfig(), 24)
        assert res.token_ids == greedy_reference(tiny, prompt, 24), (strategy, prompt)


@pytest.mark.parametrize("strategy", ["single:oracle", "confidence", "entropy", "merged"])
def test_greedy_lossless_oracle_drafter_eos_and_length_cuts(tiny, strategy):
    prompt = PROMPTS[0]
    ref = greedy_reference(tiny, prompt, 30)
    eos = ref[9]  # an EOS that falls inside a drafted chain
    first = ref.index(eos)
    oracle = OracleRunner(tiny, prompt)
    drafters = {"oracle": oracle, "rand": DrafterRunner(make_drafter(tiny, "rand", 3))}
    names = ["oracle", "rand"] if strategy != "entropy" else ["rand", "oracle"]
    for max_new, eos_ids in ((30, [eos]), (7, []), (13, [])):
        eng = engine_for(tiny, drafters, eos=eos_ids)
        res = eng.generate(prompt, parse_strategy(strategy, names), SamplingConfig(), max_new)
        want = ref[:first + 1] if eos_ids else ref[:max_new]
        assert res.token_ids == want, (strategy, max_new, eos_ids)
        plain = eng.generate(prompt, parse_strategy("none", []), SamplingConfig(), max_new)
        assert plain.token_ids == want
    # the oracle is actually accepted: several tokens per step
    eng = engine_for(tiny, drafters)
    res = eng.generate(prompt, parse_strategy("single:oracle", []), SamplingConfig(), 30)
    assert res.stats.acceptance_length > 3.0
    assert res.stats.accepted_by_depth[0] == res.stats.steps


def test_merged_selected_counts_subtree_of_accepted_path(tiny):
    prompt = PROMPTS[1]
    drafters = {"rand": DrafterRunner(make_drafter(tiny, "rand", 3)), "oracle": OracleRunner(tiny, prompt)}
    res = engine_for(tiny, drafters).generate(prompt, parse_strategy("merged", ["rand", "oracle"]),
                                              SamplingConfig(), 20)
    assert res.stats.selected.get("oracle", 0) >= res.stats.steps - 1
    assert res.token_ids == greedy_reference(tiny, prompt, 20)


def test_verifier_matches_huggingface_llama(tmp_path):
    from transformers import LlamaForCausalLM

    from taps.models.loading import load_verifier
    from tests.support import save_hf_llama

    model = random_llama(tiny_config(vocab_size=97, hidden=32, layers=2), seed=4)
    save_hf_llama(model, tmp_path / "m")
    ours = load_verifier(str(tmp_path / "m"), with_tokenizer=False).model
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    ids = torch.tensor([[5, 9, 13, 77, 2, 40]])
    with torch.no_grad():
        ref = hf(ids).logits[0]
        got = ours.logits(ours(ids, torch.arange(6)[None], None, causal_mask(6)[None, None])[0])
    assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()


def _score_alone(model, prompt, tree):
    runner = VerifierRunner(model, max_len=128)
    runner.prefill("r", prompt, SamplingConfig())
    logits, _ = runner.score_tree("r", tree)
    return logits


def test_merged_tree_logits_equal_standalone_verification(tiny):
    """Lemma A.2: every node's logits in the merged pass equal those from verifying its tree alone."""
    prompt = PROMPTS[1]
    runner_a = DrafterRunner(make_drafter(tiny, "a", 1))
    runner_b = DrafterRunner(make_drafter(tiny, "b", 2))
    v = VerifierRunner(tiny, max_len=128)
    pre = v.prefill("r", prompt, SamplingConfig())
    toks = torch.tensor(prompt[1:] + [pre.root])
    cfg = TreeConfig(depth=3, top_k=3, total_tokens=10)
    trees = [runner_a.draft("r", toks, pre.hidden, cfg), runner_b.draft("r", toks, pre.hidden, cfg)]
    trees.append(trees[0])  # a duplicate subtree: the trie verifies its token paths once
    merged = merge_trees(trees)
    assert merged.size <= trees[0].size + trees[1].size - 1

    node_of = {path: j for j, path in enumerate(token_paths(merged))}
    assert len(node_of) == merged.size  # every path once
    merged_logits = _score_alone(tiny, prompt, merged)
    for i, t in enumerate(trees):
        alone = _score_alone(tiny, prompt, t)
        idx = [node_of[path] for path in token_paths(t)]  # the merged node of each of the tree's nodes
        assert torch.allclose(merged_logits[idx], alone, atol=1e-9), i


def test_kv_compaction_after_partial_accept_equals_fresh_decoding(tiny):
    prompt = PROMPTS[0]
    ref = greedy_reference(tiny, prompt, 6)
    v = VerifierRunner(tiny, max_len=128)
    pre = v.prefill("r", prompt, SamplingConfig())
    assert pre.root == ref[0]
    # tree: root -> [wrong, ref1 -> [ref2 -> [wrong2]]] ; accepted path root, ref1, ref2; bonus ref3
    toks = [ref[0], (ref[1] + 5) % 97, ref[1], ref[2], (ref[3] + 3) % 97]
    tree = DraftTree(torch.tensor(toks), torch.tensor([-1, 0, 0, 2, 3]), torch.tensor([0, 1, 1, 2, 3]),
                     torch.zeros(5), torch.zeros(5), torch.zeros(5, dtype=torch.long))
    res = v.verify("r", tree)
    assert res.accepted_nodes == [0, 2, 3] and res.tokens == [ref[1], ref[2], ref[3]]
    assert v.cache_length("r") == len(prompt) + 3
    # continue one token on the compacted cache vs a fresh prefill of the whole prefix
    nxt = v.verify("r", DraftTree.root_only(ref[3]))
    fresh = VerifierRunner(tiny, max_len=128)
    pre2 = fresh.prefill("f", prompt + ref[:4], SamplingConfig())
    assert nxt.tokens == [pre2.root] == [ref[4]]
    assert torch.allclose(nxt.hidden[0], pre2.hidden[-1], atol=1e-9)
    # the compacted hidden states equal those of a fresh run at the same positions
    assert torch.allclose(res.hidden, pre2.hidden[len(prompt):len(prompt) + 3], atol=1e-9)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_drafter_cache_trim_equals_drafting_from_scratch(tiny, num_layers):
    """After several steps, a drafter's tree equals the tree of a new drafter fed all pairs at once
    (each decoder layer of a deeper head keeps and trims its own cache)."""
    prompt = PROMPTS[1]
    d = make_drafter(tiny, "a", 1, num_layers=num_layers)
    incremental = DrafterRunner(d)
    cfg = TreeConfig(depth=3, top_k=2, total_tokens=6)
    eng = engine_for(tiny, {"a": incremental}, tree=cfg)
    seen_tokens, seen_hidden = [], []
    orig = incremental.draft

    def spy(rid, tokens, hidden, tree, start=None):
        seen_tokens.append(tokens.clone())
        seen_hidden.append(hidden.clone())
        out = orig(rid, tokens, hidden, tree, start=start)
        spy.last = out
        return out

    incremental.draft = spy
    eng.generate(prompt, parse_strategy("single:a", []), SamplingConfig(), 12)
    fresh = DrafterRunner(d)
    tree = fresh.draft("x", torch.cat(seen_tokens), torch.cat(seen_hidden), cfg)
    assert torch.equal(tree.tokens, spy.last.tokens) and torch.equal(tree.parents, spy.last.parents)
    assert torch.allclose(tree.scores, spy.last.scores, atol=1e-6)


def test_sampling_acceptance_first_token_distribution_exact():
    """T > 0 with duplicate siblings: seeded Gumbel-max targets make the emitted token follow
    target_probs exactly (20,000 seeds, one tree per seed verified as one batch)."""
    target = torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05], dtype=torch.float64)
    # root children: token 1, token 2, token 1 again (duplicate from another subtree), token 4
    tree = DraftTree(torch.tensor([0, 1, 2, 1, 4]), torch.tensor([-1, 0, 0, 0, 0]), torch.tensor([0, 1, 1, 1, 1]),
                     torch.zeros(5), torch.zeros(5), torch.tensor([0, 0, 0, 1, 1]))
    n = 20000
    batch = VerifyBatch.from_trees([tree] * n)
    logp = target.log().expand(5, 5)
    targets = torch.cat([gumbel_targets(logp, seed, tree.depths + 10) for seed in range(n)])
    acc = accept_greedy_batch(batch, targets)
    counts = torch.zeros(5)
    for path, bonus in zip(acc.paths, acc.bonus):
        assert len(path) <= 2  # the accepted children are leaves
        counts[int(tree.tokens[path[1]]) if len(path) > 1 else bonus] += 1
    # 4 sigma band per cell: false-alarm rate < 1e-3 for the whole test
    sd = (target * (1 - target) / n).sqrt()
    assert ((counts / n - target).abs() < 4 * sd + 1e-9).all(), counts / n


def _exact_sequence_probs(model, prompt, length, sampling):
    """Probability of every continuation of `length` tokens (enumerated), under the verifier."""
    from taps.verify import process_logits

    vocab = model.config.vocab_size
    seqs = [[]]
    probs = torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(length):
            new_seqs, new_probs = [], []
            for s, p in zip(seqs, probs):
                full = prompt + s
                t = len(full)
                h = model(torch.tensor([full]), torch.arange(t)[None], None, causal_mask(t)[None, None])
                q = process_logits(model.logits(h[0, -1]).double(), sampling)
                for tok in range(vocab):
                    if q[tok] > 0:
                        new_seqs.append(s + [tok])
                        new_probs.append(p * q[tok])
            seqs, probs = new_seqs, torch.stack(new_probs)
    return {tuple(s): float(p) for s, p in zip(seqs, probs)}


@pytest.mark.slow
@pytest.mark.parametrize("strategy,sampling", [
    ("merged", SamplingConfig(temperature=1.0)),
    ("confidence", SamplingConfig(temperature=0.8, top_p=0.9)),
    ("single:a", SamplingConfig(temperature=1.0, top_k=4)),
])
def test_sampling_lossless_distribution_matches_verifier(strategy, sampling):
    """Chi-square goodness of fit of 3-token continuations to the exact verifier distribution.

    Fixed seed; threshold p < 1e-3 (the false-alarm rate of one run). Merged trees of two drafters
    over a 6-token vocabulary always contain duplicate tokens across subtrees."""
    from scipy.stats import chisquare

    model = random_llama(tiny_config(vocab_size=6, hidden=16, layers=1), seed=7, dtype=torch.float64, scale=40.0)
    drafters = {"a": DrafterRunner(make_drafter(model, "a", 1)), "b": DrafterRunner(make_drafter(model, "b", 2))}
    eng = engine_for(model, drafters, tree=TreeConfig(depth=2, top_k=3, total_tokens=7))
    prompt = [1, 4, 2]
    exact = _exact_sequence_probs(model, prompt, 3, sampling)
    n = 3000
    counts: dict[tuple, int] = {}
    torch.manual_seed(0)
    accepted_any = 0
    for i in range(n):
        s = SamplingConfig(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, seed=i)
        res = eng.generate(prompt, parse_strategy(strategy, ["a", "b"]), s, 3)
        counts[tuple(res.token_ids)] = counts.get(tuple(res.token_ids), 0) + 1
        accepted_any += res.stats.acceptance_length > 1.0
    assert all(k in exact for k in counts), "sampled a sequence of zero probability"
    keys = sorted(exact, key=lambda k: -exact[k])
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for k in keys:
        e = exact[k] * n
        if e >= 5:
            obs.append(counts.get(k, 0))
            exp.append(e)
        else:
            rest_o += counts.get(k, 0)
            rest_e += e
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    exp = [e * n / sum(exp) for e in exp]  # float rounding of the enumerated probabilities
    stat, p = chisquare(obs, exp)
    assert p > 1e-3, (stat, p)
    assert accepted_any > n // 10  # drafts were really accepted, not just bonus tokens


def test_bad_inputs_give_clear_errors(tiny):
    eng = engine_for(tiny, {"a": DrafterRunner(make_drafter(tiny, "a", 1))})
    with pytest.raises(ValueError, match="empty"):
        eng.generate([], parse_strategy("none", []), SamplingConfig(), 5)
    with pytest.raises(ContextOverflowError, match="context window"):
        eng.generate(list(range(90)) * 6, parse_strategy("none", []), SamplingConfig(), 5)
    with pytest.raises(ConfigError, match="unknown drafter 'zz'"):
        eng.generate([1, 2], parse_strategy("single:zz", []), SamplingConfig(), 5)
    with pytest.raises(ConfigError):
        eng.generate([1, 2], parse_strategy("none", []), SamplingConfig(), 0)
    with pytest.raises(ConfigError):
        SamplingConfig(temperature=-1)
    with pytest.raises(ConfigError):
        TreeConfig(total_tokens=1)


def test_drafter_for_another_verifier_is_refused(tmp_path):
    from taps.models.drafter import load_drafter, new_drafter, save_drafter
    from taps.models.loading import load_verifier
    from tests.support import save_hf_llama

    save_hf_llama(random_llama(tiny_config(vocab_size=97, hidden=32), seed=1), tmp_path / "v1")
    save_hf_llama(random_llama(tiny_config(vocab_size=97, hidden=32), seed=2), tmp_path / "v2")
    save_hf_llama(random_llama(tiny_config(vocab_size=97, hidden=64), seed=2), tmp_path / "v3")
    v1, v2, v3 = (load_verifier(str(tmp_path / n), with_tokenizer=False) for n in ("v1", "v2", "v3"))
    sha = save_drafter(new_drafter("math", v1), tmp_path / "math")
    assert load_drafter(tmp_path / "math", v1, expected_sha256=sha).config.name == "math"
    with pytest.raises(DrafterMismatchError, match="trained for verifier 'v1'"):
        load_drafter(tmp_path / "math", v3)
    with pytest.raises(DrafterMismatchError, match="fingerprint"):
        load_drafter(tmp_path / "math", v2)
    with pytest.raises(DrafterMismatchError, match="sha256"):
        load_drafter(tmp_path / "math", v1, expected_sha256="0" * 64)


def test_draft_vocabulary_map_out_of_range_is_refused_at_load(tmp_path):
    """A reduced-vocabulary drafter's d2t map must name verifier token ids (issue 33: trust nothing
    from a drafter); one id out of range, or one id twice, and the checkpoint is refused."""
    from safetensors.torch import load_file, save_file

    from taps.models.drafter import load_drafter, new_drafter, save_drafter, with_reduced_vocab
    from taps.models.loading import load_verifier
    from tests.support import save_hf_llama

    save_hf_llama(random_llama(tiny_config(vocab_size=97, hidden=32), seed=1), tmp_path / "v")
    v = load_verifier(str(tmp_path / "v"), with_tokenizer=False)
    save_drafter(with_reduced_vocab(new_drafter("math", v), torch.arange(40)), tmp_path / "math")
    assert load_drafter(tmp_path / "math", v).d2t.max() == 39
    f = tmp_path / "math" / "model.safetensors"
    for bad in (97, -1, 0):  # past the vocabulary, negative, a repeat of id 0
        state = load_file(str(f))
        state["d2t"] = torch.arange(40)
        state["d2t"][7] = bad
        save_file(state, str(f))
        with pytest.raises(DrafterMismatchError, match="d2t"):
            load_drafter(tmp_path / "math", v)


def test_adaptive_tree_policy_stays_lossless_and_prefers_cheap_productive_trees(tiny):
    from taps.adaptive import TreePolicy

    small, big = TreeConfig(depth=2, top_k=2, total_tokens=4), TreeConfig(depth=5, top_k=3, total_tokens=16)
    policy = TreePolicy({small: 0.010, big: 0.012}, warmup=2)
    prompt = PROMPTS[0]
    drafters = {"oracle": OracleRunner(tiny, prompt, depth=5)}
    eng = TapsEngine(VerifierRunner(tiny, max_len=512), drafters, small, [], policies={"single:oracle": policy})
    res = eng.generate(prompt, parse_strategy("single:oracle", []), SamplingConfig(), 40)
    assert res.token_ids == greedy_reference(tiny, prompt, 40)
    # the oracle's chain is accepted to full depth: the deep tree emits ~6 tokens/step vs ~3
    assert policy.best() == big
    arms = {(a["depth"], a["total_tokens"]): a for a in policy.summary()}
    assert arms[(5, 16)]["steps"] > arms[(2, 4)]["steps"]
