"""Test helpers: small random models (from training.tiny, which CI's tiny training config also uses),
untrained drafters over them, and the plain greedy decoding every lossless test compares against."""

from __future__ import annotations

import torch

from taps.models.llama import Llama, causal_mask
from training.tiny import make_tiny_verifier_dir, random_llama, save_hf_llama, tiny_config

__all__ = ["chain_tree", "greedy_reference", "start_local_ray", "make_tiny_verifier_dir", "random_drafter", "random_llama", "save_hf_llama",
           "tiny_config"]


def random_drafter(model: Llama, name: str, seed: int, std: float = 0.5, num_layers: int = 1):
    """An untrained drafter over a (tiny) verifier model, with weights large enough to vary its drafts
    (every decoder layer of a deeper head too)."""
    from taps.models.drafter import DrafterConfig, EagleDrafter

    torch.manual_seed(seed)
    cfg = DrafterConfig(name=name, domain=name, llama=model.config, verifier={"name": "tiny"}, num_layers=num_layers)
    d = EagleDrafter(cfg, model.embed_tokens, model.lm_head)
    with torch.no_grad():
        for p in d.parameters():
            p.normal_(0, std)
    return d.to(model.embed_tokens.weight.dtype).eval().requires_grad_(False)


def start_local_ray(**kw) -> None:
    """ray.init(address="local", **kw), once more after a failed start: Ray waits a fixed 30 s for the
    raylet to register, which a 2-core CI machine still reaping the previous test module's cluster
    can miss ("The current node timed out during startup")."""
    import time

    import ray

    try:
        ray.init(address="local", **kw)
    except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception here
        if "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        time.sleep(5)
        ray.init(address="local", **kw)


def chain_tree(tokens: list[int], drafter: str, depths: torch.Tensor | None = None):
    """A DraftTree that is one chain: tokens[0] the root, each node the child of the one before
    (`depths` defaults to 0, 1, 2, ...); what a test proposer returns."""
    from taps.tree import DraftTree

    n = len(tokens)
    return DraftTree(tokens=torch.tensor(tokens), parents=torch.arange(-1, n - 1),
                     depths=torch.arange(n) if depths is None else depths,
                     scores=-0.1 * torch.arange(n, dtype=torch.float32), entropies=torch.zeros(n),
                     source=torch.zeros(n, dtype=torch.long), drafters=(drafter,))


def greedy_reference(model: Llama, prompt: list[int], n: int, eos=()) -> list[int]:
    """Plain greedy decoding, recomputing the whole sequence each token (no cache, no trees): the
    oracle every lossless test compares against. Stops after an `eos` token (included)."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = len(seq)
            h = model(torch.tensor([seq]), torch.arange(t)[None], None, causal_mask(t)[None, None])
            nxt = int(model.logits(h[0, -1]).argmax())
            out.append(nxt)
            seq.append(nxt)
            if nxt in eos:
                break
    return out


def token_paths(tree) -> list[tuple[int, ...]]:
    """Node i of a DraftTree -> the draft tokens from the root to i (the root's path is ())."""
    toks, par, out = tree.tokens.tolist(), tree.parents.tolist(), [()]
    for j in range(1, tree.size):
        out.append(out[par[j]] + (toks[j],))
    return out
