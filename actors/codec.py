"""Protobuf <-> core types. The only place (with the gRPC server/client) that sees _pb2 classes."""

from __future__ import annotations

import torch

from proto.taps.drafter.v1 import drafter_pb2 as pb
from taps.config import ConfigError, TreeConfig
from taps.tree import DraftTree

PROTOCOL_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_ELEMENTS = 64 * 1024 * 1024  # refuse absurd shapes before allocating


def tensor_to_pb(t: torch.Tensor) -> pb.Tensor:
    t = t.detach().cpu().contiguous()
    if t.dtype not in _NAMES:
        t = t.float()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return pb.Tensor(data=raw.numpy().tobytes(), dtype=_NAMES[t.dtype], shape=list(t.shape))


def tensor_from_pb(msg: pb.Tensor, name: str = "tensor") -> torch.Tensor:
    if msg.dtype not in _DTYPES:
        raise ValueError(f"{name}: unsupported dtype {msg.dtype!r}; use one of {sorted(_DTYPES)}")
    shape = list(msg.shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"{name}: negative dimension in shape {shape}")
    numel = 1
    for s in shape:
        numel *= s
    if numel > MAX_ELEMENTS:
        raise ValueError(f"{name}: {numel} elements exceed the limit of {MAX_ELEMENTS}")
    dtype = _DTYPES[msg.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != numel * itemsize:
        raise ValueError(f"{name}: {len(msg.data)} bytes do not match shape {shape} of {msg.dtype} "
                         f"({numel * itemsize} bytes)")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    storage = torch.frombuffer(bytearray(msg.data), dtype=torch.int16 if dtype == torch.bfloat16 else dtype)
    out = storage.view(torch.bfloat16) if dtype == torch.bfloat16 else storage
    return out.reshape(shape)


def tree_config_to_pb(cfg: TreeConfig) -> pb.TreeConfig:
    return pb.TreeConfig(depth=cfg.depth, top_k=cfg.top_k, total_tokens=cfg.total_tokens)


def tree_config_from_pb(msg: pb.TreeConfig) -> TreeConfig:
    return TreeConfig(depth=msg.depth, top_k=msg.top_k, total_tokens=msg.total_tokens)


def tree_to_pb(tree: DraftTree, drafter: str = "", draft_time_s: float = 0.0) -> pb.DraftResponse:
    return pb.DraftResponse(tokens=tensor_to_pb(tree.tokens), parents=tensor_to_pb(tree.parents),
                            depths=tensor_to_pb(tree.depths), scores=tensor_to_pb(tree.scores.float()),
                            entropies=tensor_to_pb(tree.entropies.float()), source=tensor_to_pb(tree.source),
                            drafters=list(tree.drafters), drafter=drafter, draft_time_s=draft_time_s)


def tree_from_pb(msg: pb.DraftResponse) -> DraftTree:
    fields = {}
    for name, dtype in (("tokens", torch.int64), ("parents", torch.int64), ("depths", torch.int64),
                        ("scores", torch.float32), ("entropies", torch.float32), ("source", torch.int64)):
        t = tensor_from_pb(getattr(msg, name), name)
        if t.dtype != dtype or t.ndim != 1:
            raise ValueError(f"draft tree field {name} must be a 1-D {dtype} tensor")
        fields[name] = t
    tree = DraftTree(drafters=tuple(msg.drafters), **fields)
    tree.validate()
    return tree


def draft_request_to_pb(request_id: str, tokens: torch.Tensor, hidden: torch.Tensor, cfg: TreeConfig,
                        start: int | None = None) -> pb.DraftRequest:
    msg = pb.DraftRequest(request_id=request_id, tokens=tensor_to_pb(tokens.long()), hidden=tensor_to_pb(hidden),
                          tree=tree_config_to_pb(cfg))
    if start is not None:
        msg.start = start
    return msg


def draft_request_from_pb(msg: pb.DraftRequest, hidden_size: int
                          ) -> tuple[str, torch.Tensor, torch.Tensor, TreeConfig, int | None]:
    """Validate and decode; raises ValueError / ConfigError with a message for the client."""
    if not msg.request_id or len(msg.request_id) > 256:
        raise ValueError("request_id must be 1..256 characters")
    tokens = tensor_from_pb(msg.tokens, "tokens")
    hidden = tensor_from_pb(msg.hidden, "hidden")
    if tokens.dtype != torch.int64 or tokens.ndim != 1 or tokens.numel() == 0:
        raise ValueError(f"tokens must be a non-empty 1-D int64 tensor, got {msg.tokens.dtype} {list(msg.tokens.shape)}")
    if not hidden.is_floating_point() or hidden.ndim != 2 or hidden.shape != (tokens.numel(), hidden_size):
        raise ValueError(f"hidden must be a float tensor of shape [{tokens.numel()}, {hidden_size}], "
                         f"got {msg.hidden.dtype} {list(msg.hidden.shape)}")
    if not torch.isfinite(hidden).all():
        raise ValueError("hidden contains NaN or Inf")
    try:
        cfg = tree_config_from_pb(msg.tree)
    except ConfigError as e:
        raise ValueError(str(e)) from e
    start = msg.start if msg.HasField("start") else None
    if start is not None and start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    return msg.request_id, tokens, hidden.float(), cfg, start
