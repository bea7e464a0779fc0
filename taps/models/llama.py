"""A compact Llama-family transformer (nanoGPT style) with a static KV cache.

Used for the verifier and, one layer of it, for the EAGLE draft head. Loads
Hugging Face Llama weights unchanged (see `taps.models.loading`). Attention
takes an explicit boolean mask and explicit position ids, so draft trees are
verified without patching anything: the tree is just a mask.

Shapes: B batch, T new tokens, S cache slots, H hidden, nh / nkv heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # llama3 scaling as sorted (key, value) pairs, () for default rope
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Build from a Hugging Face config.json dict (transformers 4.x or 5.x spelling)."""
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = ()
        if rope.get("rope_type", rope.get("type", "default")) == "llama3":
            keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            scaling = tuple(sorted((k, float(rope[k])) for k in keep))
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in hf.items() if k in names and k not in ("rope_theta", "rope_scaling")}
        kw.setdefault("num_key_value_heads", hf["num_attention_heads"])
        kw["head_dim"] = hf.get("head_dim") or 0
        return cls(rope_theta=float(theta), rope_scaling=scaling, **kw)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["rope_scaling"] = [list(p) for p in self.rope_scaling]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        d = dict(d)
        d["rope_scaling"] = tuple(tuple(p) for p in d.get("rope_scaling", ()))
        return cls(**d)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    dim = cfg.dim_head
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if cfg.rope_scaling:
        s = dict(cfg.rope_scaling)
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        lo_wavelen, hi_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
        inv = torch.where(is_mid, mid, scaled)
    return inv


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention. q: [B, nh, T, D]; k, v: [B, nkv, S, D]; mask: [B or 1, 1, T, S] bool or None.

    The g = nh / nkv query heads that share a key/value head are folded into the query axis
    ([B, nkv, g*T, D], head h reads kv head h // g), so one plain SDPA call covers them with the
    same mask repeated g times. Measured on 2 CPU cores (EPYC Zen 4, 1 thread, S=300): SDPA's own
    `enable_gqa` path took 0.24 ms for one bf16 query row and 17.4 ms for 64 rows, the folded
    call 0.04 ms and 3.5 ms; in fp32 both are within 10% of each other."""
    b, nh, t, d = q.shape
    nkv = k.shape[1]
    if nh == nkv:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    g = nh // nkv
    if mask is not None and mask.shape[-2] > 1:
        mask = mask.repeat(1, 1, g, 1)
    y = F.scaled_dot_product_attention(q.reshape(b, nkv, g * t, d), k, v, attn_mask=mask)
    return y.view(b, nh, t, d)


class KVCache:
    """Preallocated per-layer keys/values, written in place.

    k[l], v[l]: [B, nkv, S, D]. `length` slots are valid. A forward over T new
    tokens writes slots [length, length + T) and advances `length`; `keep`
    compacts chosen slots to the front after a partial accept.
    """

    def __init__(self, cfg: LlamaConfig, num_layers: int, max_len: int, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, batch, cfg.num_key_value_heads, max_len, cfg.dim_head)
        # empty, not zeros: slots past `length` are never read (masks cover only [0, length + T));
        # one block per kind, the per-layer tensors views of it (a fused kernel takes the block)
        self._k = torch.empty(shape, dtype=dtype, device=device)
        self._v = torch.empty(shape, dtype=dtype, device=device)
        self.k, self.v = [self._k[i] for i in range(num_layers)], [self._v[i] for i in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values as [L, B, nkv, S, D] blocks, or None once `k` / `v` were replaced by other
        tensors (taps.batchgen drops rows that way)."""
        if self.k[0].data_ptr() != self._k.data_ptr() or self.v[0].data_ptr() != self._v.data_ptr():
            return None
        return self._k, self._v

    def keep(self, base: int, slots: torch.Tensor) -> None:
        """Move cache slots `slots` to [base, base + len(slots)) and truncate there.

        Example: base 7 (prefix), tree slots 7..11, accepted nodes 0, 2, 3 ->
        slots [7, 9, 10] move to [7, 8, 9]; length becomes 10.
        """
        n = int(slots.shape[0])
        dst = torch.arange(base, base + n, device=slots.device)
        if not torch.equal(slots, dst):
            for k, v in zip(self.k, self.v):
                k[:, :, base:base + n] = k[:, :, slots]
                v[:, :, base:base + n] = v[:, :, slots]
        self.length = base + n


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.dim_head
        self.nh, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.nh * d, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * d, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * d, bias=False)
        self.o_proj = nn.Linear(self.nh * d, h, bias=False)
        self.qkv_proj = None  # an engine may fuse q, k, v into one module (taps.models.quant.fuse_projections)

    def _qkv(self, x):
        if self.qkv_proj is not None:
            return self.qkv_proj(x).split([self.nh * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, mask, cache_k, cache_v, start):
        # x: [B, T, H]; cos/sin: [B, 1, T, D]; mask: [B, 1, T, start+T] bool or None (= causal-free, attend all)
        b, t, _ = x.shape
        q, k, v = self._qkv(x)
        q = q.view(b, t, self.nh, self.d).transpose(1, 2)
        k = k.view(b, t, self.nkv, self.d).transpose(1, 2)
        v = v.view(b, t, self.nkv, self.d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache_k is not None:
            cache_k[:, :, start:start + t] = k
            cache_v[:, :, start:start + t] = v
            k, v = cache_k[:, :, :start + t], cache_v[:, :, :start + t]
        y = attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.nh * self.d))


    def forward_segments(self, x, cos, sin, segments):
        """x: [1, R, H] rows of many requests (R may include padding rows at the end); each segment
        (cache, row offset, rows, mask [1, 1, rows, cache.length + rows]) attends over its own cache.
        Projections run over all rows at once; attention runs per segment with exactly the shapes
        (and kernels) of that request decoded alone, so batching never changes a request's numbers."""
        _, r, _ = x.shape
        q, k, v = self._qkv(x)
        q = q.view(1, r, self.nh, self.d).transpose(1, 2)
        k = k.view(1, r, self.nkv, self.d).transpose(1, 2)
        v = v.view(1, r, self.nkv, self.d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = x.new_zeros(1, r, self.nh * self.d)
        for seg in segments:
            s, e, base = seg.row, seg.row + seg.rows, seg.base
            ck, cv = seg.cache_k, seg.cache_v
            ck[:, :, base:base + seg.rows] = k[:, :, s:e]
            cv[:, :, base:base + seg.rows] = v[:, :, s:e]
            out = attention(q[:, :, s:e], ck[:, :, :base + seg.rows], cv[:, :, :base + seg.rows], seg.mask)
            y[:, s:e] = out.transpose(1, 2).reshape(1, seg.rows, self.nh * self.d)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = None  # an engine may fuse gate and up into one module

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache_k=None, cache_v=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_k, cache_v, start)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_segments(self, x, cos, sin, segments):
        x = x + self.self_attn.forward_segments(self.input_layernorm(x), cos, sin, segments)
        return x + self.mlp(self.post_attention_layernorm(x))


class Rotary(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg).float(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        # positions: [B, T] -> cos, sin: [B, 1, T, D]
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def run_layers(layers, fused, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               segments: list["Segment"]) -> torch.Tensor:
    """x [1, R, H] through decoder `layers` over `segments`: by `fused` (a taps/kernels Decoder over the
    same weights, one C++ call, see taps.models.quant.fused_decoder) when every segment's cache is one
    stacked block, else layer by layer in eager torch."""
    caches = [seg.cache.stacked() for seg in segments] if fused is not None else None
    if caches and all(c is not None for c in caches):
        return fused.forward(x[0].contiguous(), cos[0, 0], sin[0, 0], [c[0] for c in caches], [c[1] for c in caches],
                             [s.row for s in segments], [s.rows for s in segments], [s.base for s in segments],
                             [s.mask for s in segments])[None]
    for i, layer in enumerate(layers):
        for seg in segments:
            seg.layer = i
        x = layer.forward_segments(x, cos, sin, segments)
    return x


@dataclass
class Segment:
    """The rows [row, row + rows) of a flat batch that extend one request's KV cache at `base`
    (= cache.length before the forward); mask [1, 1, rows, base + rows] (True = attend)."""

    cache: KVCache
    row: int
    rows: int
    mask: torch.Tensor
    base: int = -1
    layer: int = 0  # set by the forward while it runs layer `layer`

    def __post_init__(self) -> None:
        if self.base < 0:
            self.base = self.cache.length

    @property
    def cache_k(self) -> torch.Tensor:
        return self.cache.k[self.layer]

    @property
    def cache_v(self) -> torch.Tensor:
        return self.cache.v[self.layer]


def padded(rows: int, quantum: int) -> int:
    """`rows` rounded up to a multiple of `quantum` (see taps.batching.row_quantum)."""
    return -(-rows // quantum) * quantum


def pad_rows(x: torch.Tensor, quantum: int) -> torch.Tensor:
    """x [R, ...] with zero rows appended up to padded(R, quantum)."""
    extra = padded(x.shape[0], quantum) - x.shape[0]
    return torch.cat([x, x.new_zeros(extra, *x.shape[1:])]) if extra else x


def build_mask(new_mask: torch.Tensor, prefix_len: int, batch: int = 1) -> torch.Tensor:
    """[T, T] mask among new tokens -> [B, 1, T, prefix_len + T] with the cached prefix visible."""
    t = new_mask.shape[-1]
    full = torch.ones(t, prefix_len + t, dtype=torch.bool, device=new_mask.device)
    full[:, prefix_len:] = new_mask
    return full.expand(batch, 1, t, prefix_len + t)


def causal_mask(t: int, device=None) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


class Llama(nn.Module):
    """Llama-family causal LM. `forward` returns post-norm hidden states (the lm_head input)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self.fused = None  # an engine may run the layers as one kernel call (taps.models.quant.fused_decoder)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.config, len(self.layers), max_len, batch, p.dtype, p.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        # input_ids, positions: [B, T]; mask: [B, 1, T, S'] bool with S' = cache.length + T
        assert input_ids.shape == positions.shape, (input_ids.shape, positions.shape)
        t = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        if cache is not None and start + t > cache.max_len:
            raise ValueError(f"KV cache overflow: {start} + {t} > {cache.max_len} slots")
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            ck = cache.k[i] if cache is not None else None
            cv = cache.v[i] if cache is not None else None
            x = layer(x, cos, sin, mask, ck, cv, start)
        if cache is not None:
            cache.length = start + t
        return self.norm(x)

    def forward_segments(self, input_ids: torch.Tensor, positions: torch.Tensor, segments: list["Segment"],
                         pad_to: int = 1) -> torch.Tensor:
        """One forward over the rows of many requests: input_ids, positions [R] flat; `segments` say
        which rows belong to which request's cache (and write there). Rows are padded to a multiple
        of `pad_to` (taps.batching.row_quantum: the row count at which this machine's matmul kernels
        give every row the same bits whatever the batch). Returns post-norm hidden states [R, H]."""
        r = int(input_ids.shape[0])
        input_ids, positions = pad_rows(input_ids, pad_to), pad_rows(positions, pad_to)
        for seg in segments:
            if seg.base + seg.rows > seg.cache.max_len:
                raise ValueError(f"KV cache overflow: {seg.base} + {seg.rows} > {seg.cache.max_len} slots")
        x = self.embed_tokens(input_ids)[None]
        cos, sin = self.rotary(positions[None], x.dtype)
        x = run_layers(self.layers, self.fused, x, cos, sin, segments)
        for seg in segments:
            seg.cache.length = seg.base + seg.rows
        return self.norm(x)[0, :r]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
