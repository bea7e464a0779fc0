"""Weight-only int8 linears for drafters.

Drafting on a CPU is bound by reading weights, not by arithmetic: between two draft calls the verifier
streams its ~200 MB of weights through the caches, so each of the drafter's matmuls (1-4 rows) reads its
weight from memory. Per-output-channel int8 weights (scale = max |w| / 127, bf16 activations, one
`torch._weight_int8pack_mm` per linear) halve those bytes against bf16. A drafter's numbers never
change the output (the verifier decides every token), so this is lossless; it only changes which
tokens are proposed, i.e. the acceptance length, which the benchmarks measure.
"""

from __future__ import annotations

import torch
from torch import nn


def int8_supported(device: str | torch.device = "cpu") -> bool:
    """Whether this torch build runs the int8 weight-only matmul on `device` (one tiny call)."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        x = torch.ones(1, 32, dtype=torch.bfloat16, device=device)
        w = torch.ones(8, 32, dtype=torch.int8, device=device)
        torch._weight_int8pack_mm(x, w, torch.ones(8, dtype=torch.bfloat16, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + b with q int8 [out, in] and one scale per output channel."""

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features, self.act_dtype = linear.in_features, linear.out_features, act_dtype
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(act_dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(act_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(self.act_dtype).contiguous(),
                                      self.qweight, self.scales)
        y = y.view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_linears(module: nn.Module, names: list[str], act_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace the nn.Linear submodules at dotted `names` by Int8Linear, in place."""
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        lin = getattr(parent, attr)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} is {type(lin).__name__}, not nn.Linear")
        setattr(parent, attr, Int8Linear(lin, act_dtype))
    return module
