"""Protobuf <-> core types for taps.drafter.v1. With the gRPC server and client, the only code that
sees generated _pb2 classes: taps/ never imports them (STYLE.md, "Protobuf only at the boundary").

Every decoder raises ValueError with a message fit for the client (the server answers it as
INVALID_ARGUMENT); taps.config.ConfigError is a ValueError too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from proto.taps.drafter.v1 import drafter_pb2 as pb
from taps.config import TreeConfig
from taps.tree import DraftTree

PROTOCOL_VERSION = 1
MAX_ELEMENTS = 64 * 1024 * 1024  # refuse absurd shapes before allocating anything
MAX_REQUEST_ID_CHARS = 256

# wire dtype name -> (torch dtype, little-endian numpy dtype of the raw bytes)
# bfloat16 has no numpy dtype: it travels as its raw 16-bit patterns and is re-viewed in torch.
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "<f4"),
    "bfloat16": (torch.bfloat16, "<i2"),
    "float16": (torch.float16, "<f2"),
    "int64": (torch.int64, "<i8"),
}
_NAMES = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}
_RAW_VIEW = {torch.bfloat16: torch.int16}  # torch dtypes numpy cannot hold: reinterpret bits first


# ---------------------------------------------------------------------------------------------- tensors
def tensor_to_pb(t: torch.Tensor) -> pb.Tensor:
    """Any CPU/GPU tensor of a supported dtype -> Tensor message (C-contiguous little-endian bytes)."""
    if t.dtype not in _NAMES:
        raise ValueError(f"cannot send a {t.dtype} tensor; supported: {sorted(_DTYPES)}")
    name = _NAMES[t.dtype]
    t = t.detach().cpu().contiguous()
    raw = t.view(_RAW_VIEW[t.dtype]) if t.dtype in _RAW_VIEW else t
    data = raw.numpy().astype(_DTYPES[name][1], copy=False).tobytes()
    return pb.Tensor(data=data, dtype=name, shape=list(t.shape))


def tensor_from_pb(msg: pb.Tensor, name: str = "tensor") -> torch.Tensor:
    """Tensor message -> CPU tensor (a fresh copy). ValueError if dtype, shape and bytes disagree."""
    if msg.dtype not in _DTYPES:
        raise ValueError(f"{name}: unsupported dtype {msg.dtype!r}; use one of {sorted(_DTYPES)}")
    torch_dtype, np_dtype = _DTYPES[msg.dtype]
    shape = list(msg.shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"{name}: negative dimension in shape {shape}")
    numel = math.prod(shape)
    if numel > MAX_ELEMENTS:
        raise ValueError(f"{name}: shape {shape} has {numel} elements, more than the limit of {MAX_ELEMENTS}")
    itemsize = np.dtype(np_dtype).itemsize
    if len(msg.data) != numel * itemsize:
        raise ValueError(f"{name}: {len(msg.data)} bytes do not match shape {shape} of {msg.dtype} "
                         f"(expected {numel} x {itemsize} = {numel * itemsize} bytes)")
    array = np.frombuffer(msg.data, dtype=np_dtype).astype(np_dtype[1:], copy=True)  # native order, writable
    out = torch.from_numpy(array)
    if torch_dtype in _RAW_VIEW:
        out = out.view(_RAW_VIEW[torch_dtype]).view(torch_dtype)
    return out.reshape(shape)


def _vector(msg: pb.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = tensor_from_pb(msg, name)
    if t.dtype != dtype or t.ndim != 1:
        raise ValueError(f"{name} must be a 1-D {_NAMES[dtype]} tensor, got {msg.dtype} {list(msg.shape)}")
    return t


# ---------------------------------------------------------------------------------------------- tree config
def tree_config_to_pb(cfg: TreeConfig) -> pb.TreeConfig:
    return pb.TreeConfig(depth=cfg.depth, top_k=cfg.top_k, total_tokens=cfg.total_tokens)


def tree_config_from_pb(msg: pb.TreeConfig) -> TreeConfig:
    """Raises ConfigError (a ValueError) for out-of-range fields; a missing message is all zeros."""
    return TreeConfig(depth=msg.depth, top_k=msg.top_k, total_tokens=msg.total_tokens)


# ---------------------------------------------------------------------------------------------- draft trees
_TREE_FIELDS = (("tokens", torch.int64), ("parents", torch.int64), ("depths", torch.int64),
                ("scores", torch.float32), ("entropies", torch.float32), ("source", torch.int64))


def tree_to_pb(tree: DraftTree, drafter: str = "", draft_time_s: float = 0.0) -> pb.DraftResponse:
    fields = {name: tensor_to_pb(getattr(tree, name).to(dtype)) for name, dtype in _TREE_FIELDS}
    return pb.DraftResponse(drafters=list(tree.drafters), drafter=drafter, draft_time_s=draft_time_s, **fields)


def tree_from_pb(msg: pb.DraftResponse) -> DraftTree:
    """DraftResponse -> validated DraftTree (shapes, root, parent order, depths, source range)."""
    fields = {name: _vector(getattr(msg, name), name, dtype) for name, dtype in _TREE_FIELDS}
    tree = DraftTree(drafters=tuple(msg.drafters), **fields)
    tree.validate()
    if msg.drafters and tree.size > 1 and not bool(((tree.source >= 0) & (tree.source < len(msg.drafters))).all()):
        raise ValueError(f"draft tree source indices must be in [0, {len(msg.drafters)})")
    return tree


# ---------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class DraftCall:
    """A decoded, validated DraftRequest."""

    request_id: str
    tokens: torch.Tensor  # [m] int64, tokens[-1] is the root
    hidden: torch.Tensor  # [m, H] float32
    tree_config: TreeConfig
    start: int | None = None  # index of tokens[0] in the request's pair sequence (idempotent retries)
    deadline_ms: int | None = None  # server-side drafting budget from the call's arrival


def draft_request_to_pb(request_id: str, tokens: torch.Tensor, hidden: torch.Tensor, tree_config: TreeConfig,
                        start: int | None = None, deadline_ms: int | None = None) -> pb.DraftRequest:
    msg = pb.DraftRequest(request_id=request_id, tokens=tensor_to_pb(tokens.long()), hidden=tensor_to_pb(hidden),
                          tree=tree_config_to_pb(tree_config))
    if start is not None:
        msg.start = start
    if deadline_ms is not None:
        msg.deadline_ms = deadline_ms
    return msg


def draft_request_from_pb(msg: pb.DraftRequest, hidden_size: int, vocab_size: int = 0) -> DraftCall:
    """Decode and validate; `vocab_size` 0 skips the token range check. Raises ValueError."""
    if not 1 <= len(msg.request_id) <= MAX_REQUEST_ID_CHARS:
        raise ValueError(f"request_id must be 1..{MAX_REQUEST_ID_CHARS} characters, got {len(msg.request_id)}")
    tokens = tensor_from_pb(msg.tokens, "tokens")
    if tokens.dtype != torch.int64 or tokens.ndim != 1 or tokens.numel() == 0:
        raise ValueError(f"tokens must be a non-empty 1-D int64 tensor, got {msg.tokens.dtype or '<unset>'} "
                         f"{list(msg.tokens.shape)}")
    if vocab_size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
    hidden = tensor_from_pb(msg.hidden, "hidden")
    m = tokens.numel()
    if not hidden.is_floating_point() or hidden.shape != (m, hidden_size):
        raise ValueError(f"hidden must be a float tensor of shape [{m}, {hidden_size}] (one row per token), "
                         f"got {msg.hidden.dtype or '<unset>'} {list(msg.hidden.shape)}")
    if not bool(torch.isfinite(hidden).all()):
        raise ValueError("hidden contains NaN or Inf")
    try:
        cfg = tree_config_from_pb(msg.tree)
    except ValueError as e:
        raise ValueError(f"tree: {e}") from e
    start = msg.start if msg.HasField("start") else None
    if start is not None and start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    deadline_ms = msg.deadline_ms if msg.HasField("deadline_ms") else None
    if deadline_ms is not None and deadline_ms <= 0:
        raise ValueError(f"deadline_ms must be > 0 when set, got {deadline_ms}")
    return DraftCall(msg.request_id, tokens, hidden.float(), cfg, start, deadline_ms)


# ---------------------------------------------------------------------------------------------- describe
_DESCRIBE_FIELDS = {"name": str, "domain": str, "objective": str, "trained": bool, "verifier": str,
                    "hidden_size": int, "vocab_size": int, "draft_vocab_size": int, "checkpoint_sha256": str,
                    "active_requests": int}


def describe_to_pb(info: dict) -> pb.DescribeResponse:
    """A runner's describe() dict (missing or None keys become empty/zero) -> DescribeResponse."""
    kwargs = {k: cast(info[k]) for k, cast in _DESCRIBE_FIELDS.items() if info.get(k) is not None}
    return pb.DescribeResponse(protocol_version=PROTOCOL_VERSION, **kwargs)


def describe_from_pb(msg: pb.DescribeResponse) -> dict:
    return {**{k: getattr(msg, k) for k in _DESCRIBE_FIELDS}, "protocol_version": msg.protocol_version}
