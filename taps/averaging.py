"""Weight averaging of drafter checkpoints: theta = sum_i w_i theta_i.

For two checkpoints with weights (lambda, 1 - lambda) this is the paper's
interpolation lambda * a + (1 - lambda) * b. Inputs must be drafters for the
same verifier (same identity and fingerprint) with identical tensor names and
shapes (and the same reduced vocabulary, if any); anything else is refused.
Weights must be finite, non-negative and sum to 1. Arithmetic is float32; the
result is stored in the dtype of the first input.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from taps.models.drafter import FORMAT, DrafterMismatchError, check_verifier, read_drafter_config, sha256_dir


def average_state_dicts(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted sum of state dicts with identical keys and shapes (integer buffers must be equal)."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per checkpoint, got {len(states)} checkpoints and {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"weights must be non-negative and sum to 1, got {weights}")
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys:
            diff = sorted(keys.symmetric_difference(s))[:4]
            raise DrafterMismatchError(f"checkpoint {i} has different tensors than checkpoint 0: {diff}")
    out = {}
    for k in sorted(keys):
        ts = [s[k] for s in states]
        for i, t in enumerate(ts[1:], 1):
            if t.shape != ts[0].shape:
                raise DrafterMismatchError(f"{k}: shape {tuple(t.shape)} in checkpoint {i} != {tuple(ts[0].shape)}")
        if not ts[0].is_floating_point():  # e.g. d2t of a reduced vocabulary: must agree
            if any(not torch.equal(t, ts[0]) for t in ts[1:]):
                raise DrafterMismatchError(f"{k}: integer tensors differ (different draft vocabularies)")
            out[k] = ts[0].clone()
            continue
        acc = torch.zeros(ts[0].shape, dtype=torch.float32)
        for w, t in zip(weights, ts):
            acc += w * t.float()
        out[k] = acc.to(ts[0].dtype)
    return out


def average_checkpoints(inputs: list[str | Path], weights: list[float], out: str | Path,
                        name: str = "averaged", domain: str = "averaged") -> str:
    """Average drafter checkpoint directories into `out` (written atomically); returns its sha256."""
    inputs = [Path(p) for p in inputs]
    cfgs = [read_drafter_config(p) for p in inputs]
    for p, c in zip(inputs[1:], cfgs[1:]):
        check_verifier(c, cfgs[0].verifier, where=f" at {p}")
        if (c.draft_vocab_size, c.num_layers, c.llama) != (cfgs[0].draft_vocab_size, cfgs[0].num_layers, cfgs[0].llama):
            raise DrafterMismatchError(f"{p} has a different drafter shape than {inputs[0]}")
    states = [load_file(str(p / "model.safetensors")) for p in inputs]
    state = average_state_dicts(states, [float(w) for w in weights])
    sources = [{"path": str(p), "name": c.name, "domain": c.domain, "objective": c.objective, "weight": float(w)}
               for p, c, w in zip(inputs, cfgs, weights)]  # before cfgs[0] is renamed below
    cfg = cfgs[0]
    cfg.name, cfg.domain, cfg.objective = name, domain, "averaged"
    cfg.training = {"averaged_from": sources}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
              metadata={"format": FORMAT})
    (tmp / "drafter.json").write_text(json.dumps(cfg.to_json(), indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return sha256_dir(out)
