"""EAGLE-2 / HASS draft head.

    input pair (f_i, x_{i+1}) -> fc([embed(x_{i+1}), f_i]) (2H -> H) -> one Llama decoder layer
    -> predicted feature f_{i+1} -> lm_head -> distribution of x_{i+2}

`num_layers` > 1 stacks more decoder layers after the first (a step past the paper, issue 18). The
first keeps its checkpoint name (`layer.*`), the others are `extra_layers.<i>.*`; a new extra layer
starts as the identity (its two residual output projections are zero), so a deeper head initialised
from a shallower one computes exactly what that one did before training moves it.

The token embedding is the verifier's (frozen, not saved). The lm_head is the
verifier's (frozen, not saved) or, with a reduced draft vocabulary (EAGLE-3
style), a trainable [V_draft, H] head over the V_draft most frequent tokens
with `d2t` mapping draft ids back to verifier token ids.

A checkpoint is a directory: `model.safetensors` + `drafter.json`, which
names the verifier it was trained for; loading refuses another verifier.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from taps.models.llama import DecoderLayer, KVCache, LlamaConfig, Rotary, pad_rows, run_layers

FORMAT = "taps-drafter/1"


class DrafterMismatchError(ValueError):
    """A drafter checkpoint does not fit the verifier it is loaded with."""


@dataclass
class DrafterConfig:
    name: str  # e.g. "math"; used in strategies (single:math) and stats
    domain: str  # what it was trained on: math, chat, code, mixed, averaged, ...
    llama: LlamaConfig  # shape of the decoder layer (the verifier's hidden size / heads)
    verifier: dict  # taps.models.loading.verifier_identity of the verifier it drafts for
    draft_vocab_size: int = 0  # 0: full verifier vocabulary through the verifier's lm_head
    objective: str = "random-init"  # eagle2, hass, averaged, or random-init (untrained)
    head: str = "own"  # reduced vocab head: "own" (trained, saved) or "verifier-rows" (the verifier's rows, not saved)
    training: dict = field(default_factory=dict)  # provenance: data, steps, loss, ...
    num_layers: int = 1  # decoder layers in the head (checkpoints before this field have one)

    @property
    def trained(self) -> bool:
        return self.objective != "random-init"

    def to_json(self) -> dict:
        d = asdict(self)
        d["llama"] = self.llama.to_dict()
        d["format"] = FORMAT
        return d

    @classmethod
    def from_json(cls, d: dict) -> "DrafterConfig":
        if d.get("format") != FORMAT:
            raise DrafterMismatchError(f"not a TAPS drafter config (format {d.get('format')!r}, want {FORMAT})")
        d = {k: v for k, v in d.items() if k != "format"}
        d["llama"] = LlamaConfig.from_dict(d["llama"])
        return cls(**d)


class EagleDrafter(nn.Module):
    def __init__(self, cfg: DrafterConfig, embed_tokens: nn.Embedding, verifier_lm_head: nn.Linear):
        super().__init__()
        self.config = cfg
        h = cfg.llama.hidden_size
        # Shared, frozen verifier modules: kept out of state_dict() by living in a plain list.
        self._frozen = [embed_tokens, verifier_lm_head]
        self.fc = nn.Linear(2 * h, h, bias=True)
        if cfg.num_layers < 1:
            raise ValueError(f"a drafter needs at least one decoder layer, got num_layers={cfg.num_layers}")
        self.layer = DecoderLayer(cfg.llama)
        self.extra_layers = nn.ModuleList(DecoderLayer(cfg.llama) for _ in range(cfg.num_layers - 1))
        self.rotary = Rotary(cfg.llama)
        self.fused = None  # the AVX2 int8 drafter runs its layers as one kernel call (quantize_int8)
        if cfg.draft_vocab_size:
            self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
            self.register_buffer("d2t", torch.arange(cfg.draft_vocab_size), persistent=True)
        else:
            self.lm_head = None
            self.d2t = None

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of activations and the KV cache (bf16 for an int8 drafter)."""
        return self.layer.input_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layer.input_layernorm.weight.device

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self._frozen[0]

    @property
    def verifier_lm_head(self) -> nn.Linear:
        return self._frozen[1]

    def init_reduced_vocab(self, token_ids: torch.Tensor) -> None:
        """Use `token_ids` ([V_draft], e.g. the most frequent tokens) as the draft vocabulary."""
        assert self.lm_head is not None and token_ids.shape == (self.config.draft_vocab_size,)
        with torch.no_grad():
            self.d2t.copy_(token_ids.to(self.d2t.device))
            self.lm_head.weight.copy_(self.verifier_lm_head.weight[token_ids.to(self.lm_head.weight.device)])

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        return KVCache(self.config.llama, self.config.num_layers, max_len, batch, self.dtype, self.device)

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return [self.layer, *self.extra_layers]

    def init_extra_layers(self, source: DecoderLayer) -> None:
        """Each extra layer: `source`'s weights with zero attention and MLP output projections, i.e. the
        identity on the residual stream until training moves it."""
        with torch.no_grad():
            for layer in self.extra_layers:
                layer.load_state_dict(source.state_dict())
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        # tokens: [B, T] (x_{i+1}); hidden: [B, T, H] (f_i); positions: [B, T] -> predicted features [B, T, H]
        assert tokens.shape == positions.shape and hidden.shape[:2] == tokens.shape, (tokens.shape, hidden.shape)
        emb = self.embed_tokens(tokens).to(self.dtype)
        x = self.fc(torch.cat((emb, hidden.to(emb.dtype)), dim=-1))
        cos, sin = self.rotary(positions, x.dtype)
        start = cache.length if cache is not None else 0
        if cache is not None and start + tokens.shape[1] > cache.max_len:
            raise ValueError(f"drafter KV cache overflow: {start} + {tokens.shape[1]} > {cache.max_len}")
        for i, layer in enumerate(self.decoder_layers):
            ck = cache.k[i] if cache is not None else None
            cv = cache.v[i] if cache is not None else None
            x = layer(x, cos, sin, mask, ck, cv, start)
        if cache is not None:
            cache.length = start + tokens.shape[1]
        return x

    def forward_segments(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                         segments: list, pad_to: int = 1) -> torch.Tensor:
        """Rows of many requests in one forward (tokens, positions [R], hidden [R, H]); each
        segment (taps.models.llama.Segment) extends one request's drafter cache. -> features [R, H]."""
        r = int(tokens.shape[0])
        tokens, hidden, positions = pad_rows(tokens, pad_to), pad_rows(hidden, pad_to), pad_rows(positions, pad_to)
        for seg in segments:
            if seg.base + seg.rows > seg.cache.max_len:
                raise ValueError(f"drafter KV cache overflow: {seg.base} + {seg.rows} > {seg.cache.max_len}")
        emb = self.embed_tokens(tokens).to(self.dtype)
        x = self.fc(torch.cat((emb, hidden.to(emb.dtype)), dim=-1))[None]
        cos, sin = self.rotary(positions[None], x.dtype)
        x = run_layers(self.decoder_layers, self.fused, x, cos, sin, segments)
        for seg in segments:
            seg.cache.length = seg.base + seg.rows
        return x[0, :r]

    def draft_logits(self, features: torch.Tensor) -> torch.Tensor:
        """[.., H] -> [.., V_draft] float logits (V_draft = vocab size without a reduced vocabulary)."""
        head = self.lm_head if self.lm_head is not None else self.verifier_lm_head
        dtype = head.weight.dtype if isinstance(head, nn.Linear) else self.dtype  # Int8Linear: bf16 in
        return head(features.to(dtype)).float()

    def to_token_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids if self.d2t is None else self.d2t[draft_ids]


INT8 = "int8"  # a drafter "dtype": int8 weight-only linears, bf16 activations and KV cache (taps.models.quant)
INT8_AVX2 = "int8-avx2"  # the same int8 weights run by taps/kernels' AVX2 kernel, float32 activations and KV cache
W8A8_AVX2 = "w8a8-avx2"  # ... by its int8-activation kernel: rows quantised to int8 into each matmul, float32 between
QUANT_KERNELS = {INT8: "torch", INT8_AVX2: "avx2", W8A8_AVX2: "w8a8"}  # int8 option -> taps.models.quant kernel
AVX2_KINDS = (INT8_AVX2, W8A8_AVX2)  # the options run by taps/kernels (float32 between matmuls)


def compute_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The activation dtype of a drafter dtype option (INT8 computes in bf16, the AVX2 kernels in
    float32; None stays None)."""
    return torch.bfloat16 if dtype == INT8 else torch.float32 if dtype in AVX2_KINDS else dtype


def quantize_int8(drafter: EagleDrafter, kernel: str = "torch") -> EagleDrafter:
    """In place, for serving: fc, the decoder layers' seven projections and the drafter's own draft head
    become weight-only int8 (taps.models.quant). kernel "torch": torch's int8 matmul, norms,
    activations and the KV cache in bf16; "avx2" / "w8a8": taps/kernels' AVX2 kernels, all of them in
    float32 (w8a8 quantises each matmul's input rows to int8).
    A full-vocabulary drafter keeps the verifier's (shared) lm_head as it is."""
    from taps.models.quant import PACKED, quantize_linears

    layers = ["layer"] + [f"extra_layers.{i}" for i in range(len(drafter.extra_layers))]
    names = ["fc"] + [f"{layer}.{part}" for layer in layers for part in
                      [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]]
    names += ["lm_head"] if drafter.lm_head is not None else []
    drafter.to(torch.float32 if kernel in PACKED else torch.bfloat16)
    quantize_linears(drafter, names, torch.bfloat16, kernel)
    if kernel in PACKED:
        from taps.models.quant import fused_decoder

        drafter.fused = fused_decoder(drafter.decoder_layers, drafter.config.llama)
    return drafter


def with_reduced_vocab(drafter: EagleDrafter, token_ids: torch.Tensor) -> EagleDrafter:
    """A copy of `drafter` whose head covers only `token_ids` ([V_draft], e.g. the most frequent tokens).

    For a full-vocabulary or "verifier-rows" drafter the new head is the verifier's lm_head rows for
    those tokens (the set may also grow: the rows are frozen verifier rows, never trained), so the
    draft distribution is the full one restricted to them and renormalised: the top-k choices are
    unchanged whenever they fall inside the new vocabulary. A drafter with its own trained head can
    only shrink.
    """
    token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if token_ids.unique().numel() != token_ids.numel():
        raise ValueError("reduced draft vocabulary has repeated token ids")
    head = "verifier-rows" if drafter.lm_head is None or drafter.config.head == "verifier-rows" else "own"
    cfg = DrafterConfig(**{**drafter.config.__dict__, "draft_vocab_size": int(token_ids.numel()), "head": head})
    out = EagleDrafter(cfg, drafter.embed_tokens, drafter.verifier_lm_head)
    state = {k: v for k, v in drafter.state_dict().items() if not k.startswith(("lm_head", "d2t"))}
    out.load_state_dict(state, strict=False)
    p = drafter.layer.input_layernorm.weight
    out = out.to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        full = drafter.lm_head.weight if drafter.lm_head is not None else drafter.verifier_lm_head.weight
        if head == "verifier-rows":  # the head is the verifier's rows: any token set, larger or smaller
            full = drafter.verifier_lm_head.weight
            rows = token_ids.to(full.device)
        elif drafter.d2t is not None:  # map token ids back to rows of an already reduced (trained) head
            row_of = {int(t): i for i, t in enumerate(drafter.d2t.tolist())}
            if any(int(t) not in row_of for t in token_ids):
                raise ValueError("a reduced head can only shrink: some token ids are not in the current draft vocabulary")
            rows = torch.tensor([row_of[int(t)] for t in token_ids], device=full.device)
        else:
            rows = token_ids.to(full.device)
        out.lm_head.weight.copy_(full[rows])
        out.d2t.copy_(token_ids.to(out.d2t.device))
    return out.eval().requires_grad_(drafter.fc.weight.requires_grad)


# ---------------------------------------------------------------------- creation, save, load

def new_drafter(name: str, verifier, domain: str | None = None, draft_vocab_size: int = 0,
                seed: int = 0, token_ids: torch.Tensor | None = None, head: str = "own",
                num_layers: int = 1) -> EagleDrafter:
    """A randomly initialised drafter for `verifier` (a taps.models.loading.Verifier, or the
    VerifierParts of load_verifier_parts: only its config, embedding, lm_head and last layer are read).

    With a reduced vocabulary, `head` "verifier-rows" freezes the head at the verifier's lm_head rows
    (nothing to train, nothing saved); "own" starts from those rows and trains them."""
    if head not in ("own", "verifier-rows"):
        raise ValueError(f"head must be 'own' or 'verifier-rows', got {head!r}")
    cfg = DrafterConfig(name=name, domain=domain or name, llama=verifier.model.config,
                        verifier=verifier.identity, draft_vocab_size=draft_vocab_size, head=head,
                        num_layers=num_layers)
    torch.manual_seed(seed)
    m = verifier.model
    drafter = EagleDrafter(cfg, m.embed_tokens, m.lm_head)
    with torch.no_grad():  # EAGLE initialises the layer from the verifier's last layer
        drafter.layer.load_state_dict(m.layers[-1].state_dict())
    drafter.init_extra_layers(m.layers[-1])
    if draft_vocab_size:
        drafter.init_reduced_vocab(token_ids if token_ids is not None else torch.arange(draft_vocab_size))
        if head == "verifier-rows":
            drafter.lm_head.requires_grad_(False)
    p = m.embed_tokens.weight
    return drafter.to(device=p.device, dtype=p.dtype)


def check_verifier(cfg: DrafterConfig, identity: dict, where: str = "") -> None:
    want, got = cfg.verifier, identity
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        if want.get(key) != got.get(key):
            raise DrafterMismatchError(
                f"drafter {cfg.name!r}{where} was trained for verifier {want.get('name')!r} "
                f"({key}={want.get(key)}), but the loaded verifier is {got.get('name')!r} ({key}={got.get(key)})")
    fa, fb = want.get("fingerprint"), got.get("fingerprint")
    if fa and fb and any(abs(a - b) > 1e-2 * max(1.0, abs(a)) for a, b in zip(fa, fb)):
        raise DrafterMismatchError(
            f"drafter {cfg.name!r}{where} was trained for verifier {want.get('name')!r} whose embedding "
            f"fingerprint differs from the loaded verifier {got.get('name')!r}: different weights")


def sha256_dir(path: Path) -> str:
    """sha256 over a checkpoint's weight file (what the registry records)."""
    h = hashlib.sha256()
    with open(Path(path) / "model.safetensors", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_drafter(drafter: EagleDrafter, directory: str | Path) -> str:
    """Write model.safetensors + drafter.json atomically; returns the weights' sha256."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=directory.name + ".tmp"))
    state = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    if drafter.config.head == "verifier-rows":
        state.pop("lm_head.weight", None)  # rebuilt from the verifier's lm_head and d2t at load time
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
    (tmp / "drafter.json").write_text(json.dumps(drafter.config.to_json(), indent=2))
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        os.replace(directory, old)
        os.replace(tmp, directory)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, directory)
    return sha256_dir(directory)


def read_drafter_config(directory: str | Path) -> DrafterConfig:
    directory = Path(directory)
    cfg_file = directory / "drafter.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{directory} is not a drafter checkpoint (no drafter.json)")
    try:
        return DrafterConfig.from_json(json.loads(cfg_file.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise DrafterMismatchError(f"{cfg_file} is not a valid drafter config: {e}") from e


def load_drafter(directory: str | Path, verifier, name: str | None = None,
                 expected_sha256: str | None = None, dtype: torch.dtype | None = None) -> EagleDrafter:
    """Load a drafter checkpoint for `verifier` (a Verifier or VerifierParts: its identity, embedding and
    lm_head are read), refusing a mismatched verifier or a bad checksum.

    `dtype` defaults to the verifier's; a cheaper drafter dtype (bf16) never affects losslessness.
    """
    directory = Path(directory)
    cfg = read_drafter_config(directory)
    check_verifier(cfg, verifier.identity, where=f" at {directory}")
    if expected_sha256 and sha256_dir(directory) != expected_sha256:
        raise DrafterMismatchError(f"{directory}/model.safetensors does not match its recorded sha256")
    if name:
        cfg.name = name
    m = verifier.model
    drafter = EagleDrafter(cfg, m.embed_tokens, m.lm_head)
    state = load_file(str(directory / "model.safetensors"))
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    if drafter.d2t is not None:  # draft ids map to verifier token ids: each must be one, and only once
        d2t, vocab = drafter.d2t, cfg.llama.vocab_size
        if not bool(((d2t >= 0) & (d2t < vocab)).all()) or d2t.unique().numel() != d2t.numel():
            raise DrafterMismatchError(f"{directory}: its draft vocabulary map (d2t) has ids outside [0, {vocab}) "
                                       f"or repeated ids")
    if cfg.head == "verifier-rows" and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
        with torch.no_grad():
            drafter.lm_head.weight.copy_(m.lm_head.weight[drafter.d2t.to(m.lm_head.weight.device)].to(
                drafter.lm_head.weight.dtype))
    if missing or unexpected:
        raise DrafterMismatchError(f"{directory}: weights do not fit the drafter (missing {missing[:4]}, "
                                   f"unexpected {unexpected[:4]})")
    p = m.embed_tokens.weight
    return drafter.to(device=p.device, dtype=dtype or p.dtype).eval().requires_grad_(False)
