"""Verifier feature extraction: run the verifier once over tokenized conversations and store
what drafter training needs in safetensors shards.

Shard `shard-00007.safetensors` holds sequences [7 * S, 8 * S) (S = shard_size), concatenated:

    input_ids  int32    [N]      tokens of all its sequences
    loss_mask  uint8    [N]      1 on assistant tokens
    hidden     bfloat16 [N, H]   post-norm verifier hidden states f_i (the lm_head input)
    offsets    int64    [n + 1]  sequence j is rows offsets[j]:offsets[j+1]

Only hidden states are stored, not logits: the verifier's lm_head(f_i) reproduces its
logits, so target distributions and top-K are computed on the fly from the stored
features during training (exact, 576 x 2 bytes per token instead of a vocab row).

Shards are written to a temporary name and renamed, so an existing shard is complete;
a rerun after a kill skips them. `manifest.json` (written last) records the verifier
identity, sequence / token counts and shard names; `load_features` refuses a
mismatched verifier or a shard that does not read back.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from taps.models.llama import causal_mask

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class FeatureError(RuntimeError):
    """Feature shards are missing, corrupt, or were made by a different verifier."""


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


@torch.no_grad()
def verifier_hidden(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Post-norm hidden states [len_j, H] of each sequence, batched with right padding (causal mask:
    padding after a sequence never affects its positions)."""
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, :len(s)] = torch.tensor(s)
    device = model.embed_tokens.weight.device
    ids = ids.to(device)
    pos = torch.arange(t, device=device)[None].expand(len(seqs), t)
    mask = causal_mask(t, device)[None, None].expand(len(seqs), 1, t, t)
    h = model(ids, pos, None, mask)
    return [h[j, :len(s)].to(torch.bfloat16).cpu() for j, s in enumerate(seqs)]


def extract_features(verifier, examples: list[dict], out_dir: str | Path, shard_size: int = 64,
                     batch_size: int = 8, source: dict | None = None, progress: bool = True) -> Path:
    """examples: [{"input_ids": [...], "loss_mask": [...]}] -> shards + manifest under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not examples:
        raise FeatureError("no examples to extract features from")
    identity = verifier.identity
    old = out_dir / MANIFEST
    if old.exists() and json.loads(old.read_text()).get("verifier", {}).get("name") != identity["name"]:
        raise FeatureError(f"{out_dir} holds features of another verifier; use a new directory")
    n_shards = (len(examples) + shard_size - 1) // shard_size
    total = sum(len(e["input_ids"]) for e in examples)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="tok", desc=f"features {out_dir.name}", disable=not progress)
    for i in range(n_shards):
        part = examples[i * shard_size:(i + 1) * shard_size]
        path = out_dir / _shard_name(i)
        n_tok = sum(len(e["input_ids"]) for e in part)
        if path.exists():
            bar.update(n_tok)
            continue
        order = sorted(range(len(part)), key=lambda j: len(part[j]["input_ids"]))  # less padding
        hidden: list[torch.Tensor | None] = [None] * len(part)
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            for j, h in zip(idx, verifier_hidden(verifier.model, [part[j]["input_ids"] for j in idx])):
                hidden[j] = h
            bar.update(sum(len(part[j]["input_ids"]) for j in idx))
        lengths = torch.tensor([len(e["input_ids"]) for e in part])
        tensors = {
            "input_ids": torch.tensor([t for e in part for t in e["input_ids"]], dtype=torch.int32),
            "loss_mask": torch.tensor([m for e in part for m in e["loss_mask"]], dtype=torch.uint8),
            "hidden": torch.cat(hidden).contiguous(),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"verifier": identity["name"]})
        os.replace(tmp, path)
    bar.close()
    manifest = {"verifier": identity, "sequences": len(examples), "tokens": total,
                "assistant_tokens": sum(int(sum(e["loss_mask"])) for e in examples),
                "shard_size": shard_size, "shards": [_shard_name(i) for i in range(n_shards)],
                "hidden_size": verifier.model.config.hidden_size, "source": source or {}}
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out_dir / MANIFEST)
    return out_dir


@dataclass
class FeatureSet:
    """All sequences of a feature directory in memory (bf16 hidden states)."""

    input_ids: list[torch.Tensor]  # [len] int64 each
    loss_mask: list[torch.Tensor]  # [len] uint8 each
    hidden: list[torch.Tensor]  # [len, H] bf16 each
    manifest: dict

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: list[int], max_len: int) -> dict:
        """Right-padded batch: input_ids [B, T], hidden [B, T, H], loss_mask [B, T], lengths [B]."""
        lens = [min(len(self.input_ids[i]), max_len) for i in indices]
        t, h = max(lens), self.hidden[indices[0]].shape[-1]
        out = {"input_ids": torch.zeros(len(indices), t, dtype=torch.long),
               "hidden": torch.zeros(len(indices), t, h, dtype=torch.bfloat16),
               "loss_mask": torch.zeros(len(indices), t, dtype=torch.uint8),
               "lengths": torch.tensor(lens)}
        for r, (i, n) in enumerate(zip(indices, lens)):
            out["input_ids"][r, :n] = self.input_ids[i][:n]
            out["hidden"][r, :n] = self.hidden[i][:n]
            out["loss_mask"][r, :n] = self.loss_mask[i][:n]
        return out


def load_features(directories: list[str | Path], identity: dict | None = None) -> FeatureSet:
    """Load (and concatenate) feature directories, checking the verifier that made them."""
    ids, masks, hidden, manifests = [], [], [], []
    for d in map(Path, directories):
        mf = d / MANIFEST
        if not mf.exists():
            raise FeatureError(f"{d} has no {MANIFEST}: feature extraction did not finish (rerun it to resume)")
        manifest = json.loads(mf.read_text())
        if identity is not None:
            want = manifest["verifier"]
            for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
                if want.get(key) != identity.get(key):
                    raise FeatureError(f"{d} was extracted with verifier {want.get('name')!r} ({key}="
                                       f"{want.get(key)}), not {identity.get('name')!r} ({key}={identity.get(key)})")
        for name in manifest["shards"]:
            try:
                s = load_file(str(d / name))
                off = s["offsets"].tolist()
                if off[-1] != s["input_ids"].shape[0] or s["hidden"].shape[0] != off[-1]:
                    raise FeatureError(f"{d / name}: inconsistent shard (offsets {off[-1]}, "
                                       f"tokens {s['input_ids'].shape[0]}, hidden {tuple(s['hidden'].shape)})")
            except (SafetensorError, OSError, KeyError) as e:
                raise FeatureError(f"{d / name} is missing or corrupt ({e}); delete it and rerun extraction") from e
            for a, b in zip(off[:-1], off[1:]):
                ids.append(s["input_ids"][a:b].long())
                masks.append(s["loss_mask"][a:b])
                hidden.append(s["hidden"][a:b])
        manifests.append(manifest)
    if not ids:
        raise FeatureError(f"no sequences in {list(map(str, directories))}")
    return FeatureSet(ids, masks, hidden, {"parts": manifests})
