"""Batched autoregressive generation on the taps Llama (static KV cache, left padding).

Used for self-distillation (training/distill.py): on CPU it is several times faster
than Hugging Face `generate` for the small default verifier, because the cache is
preallocated once per batch and finished rows are dropped from the batch.

    gen = batch_generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=64, eos_ids={2})
"""

from __future__ import annotations

import torch

from taps.models.llama import Llama


@torch.inference_mode()
def batch_generate(model: Llama, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int],
                   temperature: float = 0.0, generator: torch.Generator | None = None) -> list[list[int]]:
    """New tokens for every prompt (EOS included when produced). Greedy at temperature 0, else sampled."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.embed_tokens.weight.device
    b, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(b, width, dtype=torch.long, device=device)
    valid = torch.zeros(b, width, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token sits at column width-1
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        valid[i, width - len(p):] = True
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    eye = torch.eye(width, dtype=torch.bool, device=device)  # padding rows attend to themselves (no NaN)
    mask = ((causal[None] & valid[:, None, :]) | eye[None])[:, None]
    cache = model.new_cache(width + max_new_tokens, batch=b)
    hidden = model(ids, pos, cache, mask)[:, -1]
    rows = torch.arange(b, device=device)  # original index of each live row
    last_pos = pos[:, -1]
    keys = valid  # [live, S] which cache slots each live row may attend to
    out: list[list[int]] = [[] for _ in range(b)]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        logits = model.logits(hidden)
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            nxt = logits.argmax(-1)
        for r, t in zip(rows.tolist(), nxt.tolist()):
            out[r].append(t)
        live = ~torch.isin(nxt, eos)
        if step == max_new_tokens - 1 or not bool(live.any()):
            break
        if not bool(live.all()):  # drop finished rows from the batch and the cache
            keep = live.nonzero()[:, 0]
            rows, nxt, last_pos, keys = rows[keep], nxt[keep], last_pos[keep], keys[keep]
            cache.k = [k[keep] for k in cache.k]
            cache.v = [v[keep] for v in cache.v]
        last_pos = last_pos + 1
        keys = torch.cat([keys, torch.ones(len(rows), 1, dtype=torch.bool, device=device)], dim=1)
        hidden = model(nxt[:, None], last_pos[:, None], cache, keys[:, None, None, :])[:, -1]
    return out
