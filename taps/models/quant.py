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
        q, scale = per_channel_int8(linear.weight)
        self.in_features, self.out_features, self.act_dtype = linear.in_features, linear.out_features, act_dtype
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scale.to(act_dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(act_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of any float dtype in; the matmul runs in act_dtype; the result comes back in x's dtype
        (a float32 model with int8 linears keeps its residual stream, norms and attention in float32)."""
        lead = x.shape[:-1]
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(self.act_dtype).contiguous(),
                                      self.qweight, self.scales)
        y = y.view(*lead, self.out_features)
        y = y if self.bias is None else y + self.bias
        return y.to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight, float32 [out, in] (built on each access: for readers such as a
        drafter that copies rows of the verifier's lm_head, not for the forward)."""
        return self.qweight.float() * self.scales.float()[:, None]


def per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (q int8 [out, in], scale float32 [out]) with w ~ q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class PackedInt8Linear(nn.Module):
    """The same per-channel int8 weights as Int8Linear, run by this project's AVX2 kernels: float32
    rows in, float32 out, weights read from memory once per call whatever the row count; each row's
    result is bit-identical alone or batched. Build with `packed_int8_supported()` true.

    a8 False (taps/kernels/int8_gemm.cpp): float32 activations, weights packed [out/8, in, 8].
    a8 True (w8a8_gemm.cpp): the rows are quantised to int8 in blocks of 32 values (llama.cpp's Q8_0
    activations) and multiplied by integer dot products, weights packed [out/8, in/4, 32]: less
    arithmetic per weight, so many rows cost little more than one (a whole forward: 7.3 ms at one row
    and 16.4 at eight, against 9.9 and 20.7 for a8 False; docs/performance.md); `in` must be a multiple
    of 32."""

    def __init__(self, linear: nn.Linear, a8: bool = False):
        super().__init__()
        from taps.kernels import cpu_kernels

        self._kernel = cpu_kernels()
        self.in_features, self.out_features, self.a8 = linear.in_features, linear.out_features, a8
        if a8 and self.in_features % 32:
            raise ValueError(f"the w8a8 kernel takes input widths that are multiples of 32, not {self.in_features}")
        q, scale = per_channel_int8(linear.weight)
        self.act_dtype = torch.float32
        pad = -self.out_features % 8  # the kernel packs blocks of 8 output channels: zero rows, sliced off
        if pad:
            q = torch.cat([q, q.new_zeros(pad, q.shape[1])])
            scale = torch.cat([scale, scale.new_ones(pad)])
        self.register_buffer("packed", (self._kernel.pack_w8a8 if a8 else self._kernel.pack)(q))
        self.register_buffer("scales", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        mm = self._kernel.mm_w8a8 if self.a8 else self._kernel.mm
        y = mm(x.reshape(-1, self.in_features).float(), self.packed, self.scales)
        if y.shape[1] != self.out_features:
            y = y[:, :self.out_features]
        y = y.reshape(*lead, self.out_features)
        y = y if self.bias is None else y + self.bias
        return y.to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight, float32 [out, in] (built on each access, for readers only)."""
        p = self.packed
        q = (p.view(p.shape[0], -1, 8, 4).permute(0, 2, 1, 3) if self.a8 else p.transpose(1, 2))
        q = q.reshape(-1, self.in_features)[:self.out_features]
        return q.float() * self.scales[:self.out_features, None]

    def _apply(self, fn, recurse=True):  # .to(dtype) must not touch the kernel's float32 scales
        packed, scales, bias = self.packed, self.scales, self.bias
        super()._apply(fn, recurse)
        self.packed, self.scales, self.bias = packed, scales, bias
        return self


KERNELS = ("torch", "avx2", "w8a8")  # int8 kernels: torch's weight-only matmul, and taps/kernels' two
PACKED = ("avx2", "w8a8")  # the kernels of PackedInt8Linear (fused decoder stack available)


def packed_int8_supported() -> bool:
    """Whether the AVX2 int8 kernel builds and runs here (x86-64 with AVX2 + FMA, g++ and ninja)."""
    from taps.kernels import cpu_kernels

    return cpu_kernels() is not None


def quantize_linears(module: nn.Module, names: list[str], act_dtype: torch.dtype = torch.bfloat16,
                     kernel: str = "torch") -> nn.Module:
    """Replace the nn.Linear submodules at dotted `names`, in place: by Int8Linear (kernel "torch",
    `act_dtype` rows) or PackedInt8Linear (kernel "avx2": float32 rows; "w8a8": rows quantised to int8)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown int8 kernel {kernel!r}; use one of {', '.join(KERNELS)}")
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        lin = getattr(parent, attr)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} is {type(lin).__name__}, not nn.Linear")
        setattr(parent, attr, Int8Linear(lin, act_dtype) if kernel == "torch"
                else PackedInt8Linear(lin, a8=kernel == "w8a8"))
    return module


def fuse_projections(model: nn.Module) -> nn.Module:
    """In place: every decoder layer's q, k, v projections become one linear (`qkv_proj`) and its gate
    and up projections another (`gate_up_proj`), so a step makes 4 matmul calls per layer instead of
    7. Each output channel is the same dot product as before: per-channel quantisation and the AVX2
    kernel give every channel the same bits fused or not."""
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None:
            attn.qkv_proj = _concat([attn.q_proj, attn.k_proj, attn.v_proj])
            del attn.q_proj, attn.k_proj, attn.v_proj
        if mlp.gate_up_proj is None:
            mlp.gate_up_proj = _concat([mlp.gate_proj, mlp.up_proj])
            del mlp.gate_proj, mlp.up_proj
    return model


def _concat(linears: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([lin.weight.detach() for lin in linears])
    out = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    out.weight = nn.Parameter(w, requires_grad=False)
    return out


def quantize_verifier(model: nn.Module, act_dtype: torch.dtype = torch.bfloat16,
                      model_dtype: torch.dtype | None = None, kernel: str = "torch", fuse: bool = True) -> nn.Module:
    """An int8 verifier engine, in place: every projection of every decoder layer and the lm_head
    become weight-only int8 (per output channel, quantised from the weights as loaded); the
    embedding, norms, attention and KV cache run in `model_dtype` (default: act_dtype). A tied
    lm_head gets its own int8 copy; the embedding table stays a lookup.

    kernel "torch": Int8Linear (torch's `_weight_int8pack_mm`, `act_dtype` rows); "avx2":
    PackedInt8Linear (taps/kernels/int8_gemm.cpp, float32 rows); "w8a8": PackedInt8Linear with rows
    quantised to int8 in blocks of 32 (w8a8_gemm.cpp). Each is a target model of its own,
    different from the float32 verifier; batching never changes its output where
    taps.batching.row_quantum finds its kernel row-invariant (the AVX2 kernel is by construction).
    `fuse` (AVX2 kernels): q/k/v and gate/up as one matmul each (fuse_projections), same bits."""
    if kernel in PACKED and fuse:  # (the torch-kernel engine stays unfused: the fused variant was not measured)
        fuse_projections(model)
    quantize_linears(model, [n for n, m in model.named_modules() if isinstance(m, nn.Linear)], act_dtype, kernel)
    model.to(model_dtype or act_dtype)
    for m in model.modules():  # .to() cast the scales too (exactly: they were act_dtype values)
        if isinstance(m, Int8Linear):
            m.scales = m.scales.to(act_dtype)
            m.bias = None if m.bias is None else m.bias.to(act_dtype)
    if kernel in PACKED:
        model.fused = fused_decoder(model.layers, model.config)
    return model


def fused_decoder(layers, cfg):
    """A taps/kernels `Decoder` over these decoder layers' PackedInt8Linear weights (shared, except q/k/v
    and gate/up of unfused layers, concatenated once), or None where it cannot run them: then the
    eager layers serve. The Decoder computes every row of a step in one C++ call (decoder.cpp); like
    the matmul, each row's result is the same alone or batched."""
    from taps.kernels import cpu_kernels

    mod = cpu_kernels()
    if mod is None:
        return None

    def packed(linears):
        if len(linears) == 1:
            return linears[0].packed, linears[0].scales
        return torch.cat([lin.packed for lin in linears]), torch.cat([lin.scales for lin in linears])

    weights = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj]
        linears = [*qkv, attn.o_proj, *gate_up, mlp.down_proj]
        if not all(isinstance(lin, PackedInt8Linear) and lin.bias is None and lin.out_features % 8 == 0
                   for lin in linears):
            return None
        norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        if any(w.dtype != torch.float32 for w in norms):
            return None
        weights.append([norms[0].detach().contiguous(), *packed(qkv), *packed([attn.o_proj]),
                        norms[1].detach().contiguous(), *packed(gate_up), *packed([mlp.down_proj])])
    try:
        return mod.Decoder(weights, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_head, cfg.rms_norm_eps)
    except RuntimeError as e:  # a shape the kernel does not take (e.g. head dim not a multiple of 16)
        import logging

        logging.getLogger(__name__).info("fused decoder unavailable: %s", str(e).splitlines()[0])
        return None
