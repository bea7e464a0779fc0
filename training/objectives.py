"""Drafter training objectives: EAGLE-2 and HASS, on the inference drafter module itself.

A training batch holds verifier features over whole sequences (see
`training/features.py`):

    input_ids [B, T]  x_0 .. x_{T-1}
    hidden    [B, T, H]  f_0 .. f_{T-1}   (post-norm, the lm_head input)
    loss_mask [B, T]  1 on assistant tokens
    lengths   [B]     valid tokens per row (right padding)

The drafter consumes pairs (f_t, x_{t+1}) and predicts f_{t+1} (whose lm_head
gives the distribution of x_{t+2}), exactly as at inference (see
docs/architecture.md). So, with T' = T - 1 training positions:

    tokens  = input_ids[:, 1:]     x_{t+1}       [B, T']
    inputs  = hidden[:, :-1]       f_t           [B, T', H]
    target  = hidden[:, 1:]        f_{t+1}       [B, T', H]
    weight  = loss_mask[:, 1:]     the input token x_{t+1} is an assistant token
                                   (at inference the root, i.e. the first pair
                                   whose prediction is drafted, is one)

EAGLE-2 (Li et al. 2024): smooth-L1 regression of f_{t+1} (weight 1.0) + 0.1 *
cross-entropy against the verifier's distribution softmax(lm_head(f_{t+1})),
with uniform noise U(-0.5, 0.5) * 0.2 * 512 / H added to the input features.

HASS (Zhang et al. 2025) adds a top-K (K=10, weight 1.0) distillation term,
-sum_{k in topK(q)} q_k log p_k, and harmonized context alignment: alignment
step j (j = 1..steps) feeds, at position t, the drafter's own prediction of
step j-1 made at position t-1 (position 0 keeps the target feature), and its
attention sees

    target-feature keys (step 1) at positions u <= t - (j - 1)
    step-k keys (k = 2..j)       at the single position t - (j - k)

which is what a depth-j draft node sees at inference: the verified prefix, then
its own draft ancestors. Example, steps = 3, query t = 5 of step 3: target keys
0..3, step-2 key 4, step-3 key 5 (itself). The mask of step j depends only on j,
so step j is one drafter forward over the step-j inputs with a KV cache holding
the keys of steps 1..j-1 (the inference `KVCache` + boolean mask path). The
HASS reference multiplies masked attention scores by 0 before the softmax; we
mask with -inf (the keys a draft node cannot see at inference).
The inputs of step j+1 are detached, as in the reference; the loss is the sum
over steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from taps.models.drafter import EagleDrafter
from taps.models.llama import KVCache

OBJECTIVES = ("eagle2", "hass")


@dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "eagle2"  # eagle2 | hass
    v_w: float = 1.0  # smooth-L1 feature regression weight
    p_w: float = 0.1  # cross-entropy against the verifier distribution
    topk: int = 10  # HASS top-K distillation: K
    topk_w: float = 1.0  # HASS top-K distillation weight (0 for eagle2)
    steps: int = 3  # HASS alignment steps (1 for eagle2)
    noise_std: float = 0.2  # EAGLE uniform input noise; 0 disables

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.name!r}; use one of {OBJECTIVES}")
        if self.steps < 1 or self.topk < 1:
            raise ValueError("objective steps and topk must be >= 1")

    @classmethod
    def for_name(cls, name: str, **overrides) -> "ObjectiveConfig":
        base = {"eagle2": dict(topk_w=0.0, steps=1), "hass": dict(topk_w=1.0, steps=3)}
        if name not in base:
            raise ValueError(f"unknown objective {name!r}; use one of {OBJECTIVES}")
        return cls(name=name, **{**base[name], **overrides})


# ---------------------------------------------------------------------- batch layout

def training_pairs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """batch -> (tokens [B, T'], inputs [B, T', H], target [B, T', H], weight [B, T'] float)."""
    ids, hidden, mask, lengths = batch["input_ids"], batch["hidden"], batch["loss_mask"], batch["lengths"]
    b, t = ids.shape
    assert hidden.shape[:2] == (b, t) and mask.shape == (b, t) and lengths.shape == (b,), \
        (ids.shape, hidden.shape, mask.shape, lengths.shape)
    valid = torch.arange(t - 1, device=ids.device)[None] + 1 < lengths[:, None]  # target f_{t+1} exists
    weight = (mask[:, 1:].bool() & valid).float()
    return ids[:, 1:], hidden[:, :-1], hidden[:, 1:], weight


def uniform_noise(like: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """EAGLE's input noise: U(-0.5, 0.5) * std * 512 / H."""
    u = torch.rand(like.shape, generator=generator, device="cpu", dtype=torch.float32).to(like.device)
    return ((u - 0.5) * (std * 512 / like.shape[-1])).to(like.dtype)


def causal(t: int, device) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


def alignment_mask(step: int, t: int, device=None) -> torch.Tensor:
    """Boolean [T, step * T] mask of HASS alignment step `step` (1-based) over the keys of steps 1..step.

    Key block k-1 holds the keys of step k. Query t sees step-1 keys u <= t - (step - 1) and the
    step-k key at t - (step - k) for k = 2..step (so step 1 is plain causal attention).
    Example step 2, T 3: rows [[0 0 0 | 1 0 0], [1 0 0 | 0 1 0], [1 1 0 | 0 0 1]].
    """
    q = torch.arange(t, device=device)[:, None]
    u = torch.arange(t, device=device)[None, :]
    blocks = [u <= q - (step - 1)]
    for k in range(2, step + 1):
        blocks.append(u == q - (step - k))
    return torch.cat(blocks, dim=1)


# ---------------------------------------------------------------------- losses

def _position_losses(drafter: EagleDrafter, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                     cfg: ObjectiveConfig) -> dict[str, torch.Tensor]:
    """Loss terms over the weighted positions. pred/target [B, T', H], weight [B, T']."""
    sel = weight > 0
    n = sel.sum().clamp(min=1).float()
    pred_s, target_s = pred[sel], target[sel].to(pred.dtype)  # [N, H]
    vloss = F.smooth_l1_loss(pred_s.float(), target_s.float(), reduction="none").mean(-1).sum() / n
    with torch.no_grad():
        t_logits = drafter.draft_logits(target_s)  # [N, V_draft] verifier distribution (draft vocab)
        target_p = torch.softmax(t_logits, dim=-1)
    logp = torch.log_softmax(drafter.draft_logits(pred_s), dim=-1)
    plogp = target_p * logp
    ploss = -plogp.sum() / n
    out = {"vloss": vloss, "ploss": ploss}
    if cfg.topk_w:
        top = target_p.topk(cfg.topk, dim=-1).indices
        out["topk_loss"] = -plogp.gather(-1, top).sum() / n
    with torch.no_grad():
        out["acc"] = (logp.argmax(-1) == t_logits.argmax(-1)).float().sum() / n
    out["loss"] = cfg.v_w * vloss + cfg.p_w * ploss + cfg.topk_w * out.get("topk_loss", 0.0)
    return out


def _positions(b: int, t: int, device) -> torch.Tensor:
    return torch.arange(t, device=device)[None].expand(b, t)


def eagle2_loss(drafter: EagleDrafter, batch: dict, cfg: ObjectiveConfig,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    tokens, inputs, target, weight = training_pairs(batch)
    b, t = tokens.shape
    inputs = inputs.to(drafter.fc.weight.dtype)
    if cfg.noise_std:
        inputs = inputs + uniform_noise(inputs, cfg.noise_std, generator)
    mask = causal(t, tokens.device)[None, None].expand(b, 1, t, t)
    pred = drafter(tokens, inputs, _positions(b, t, tokens.device), None, mask)
    return _position_losses(drafter, pred, target, weight, cfg)


def next_step_inputs(first: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """HASS: step j+1's input at t is step j's prediction at t - 1; position 0 keeps `first` ([B, 1, H])."""
    return torch.cat([first, pred[:, :-1]], dim=1).detach()


def hass_features(drafter: EagleDrafter, tokens: torch.Tensor, inputs: list[torch.Tensor] | torch.Tensor,
                  steps: int, perturb=None) -> list[torch.Tensor]:
    """Predicted features of every alignment step: list of `steps` tensors [B, T', H].

    `inputs` is the step-1 input features [B, T', H]. `perturb(step, inputs) -> inputs`, if given,
    may change the inputs of a step before it runs (tests use it to check what each step sees).
    """
    b, t = tokens.shape
    device = tokens.device
    pos = _positions(b, t, device)
    preds: list[torch.Tensor] = []
    prev: KVCache | None = None
    x = inputs
    for step in range(1, steps + 1):
        if perturb is not None:
            x = perturb(step, x)
        # a fresh cache per step (no in-place writes into tensors an earlier step saved for backward)
        cache = KVCache(drafter.config.llama, drafter.config.num_layers, step * t, b, drafter.fc.weight.dtype, device)
        if prev is not None:
            for i in range(drafter.config.num_layers):
                cache.k[i][:, :, :(step - 1) * t] = prev.k[i]
                cache.v[i][:, :, :(step - 1) * t] = prev.v[i]
        cache.length = (step - 1) * t
        mask = alignment_mask(step, t, device)[None, None].expand(b, 1, t, step * t)
        pred = drafter(tokens, x, pos, cache, mask)
        preds.append(pred)
        prev = cache
        x = next_step_inputs(inputs[:, :1], pred)
    return preds


def hass_loss(drafter: EagleDrafter, batch: dict, cfg: ObjectiveConfig,
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    tokens, inputs, target, weight = training_pairs(batch)
    inputs = inputs.to(drafter.fc.weight.dtype)
    if cfg.noise_std:
        inputs = inputs + uniform_noise(inputs, cfg.noise_std, generator)
    preds = hass_features(drafter, tokens, inputs, cfg.steps)
    per_step = [_position_losses(drafter, p, target, weight, cfg) for p in preds]
    out = {k: sum(s[k] for s in per_step) / len(per_step) for k in per_step[0] if k != "loss"}
    out["loss"] = sum(s["loss"] for s in per_step)  # the reference backpropagates every step's loss
    for j, s in enumerate(per_step, 1):
        out[f"acc_step{j}"] = s["acc"]
    return out


def objective_loss(drafter: EagleDrafter, batch: dict, cfg: ObjectiveConfig,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    fn = eagle2_loss if cfg.name == "eagle2" else hass_loss
    return fn(drafter, batch, cfg, generator)
