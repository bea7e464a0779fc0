"""The tiny verifier of training/configs/tiny.yaml (CI's end-to-end training config, `make_tiny_workspace`
in training.prepare): a random 2-layer Llama saved in Hugging Face format with the default verifier's
tokenizer, so text and chat templates work. The tests build their small models from here too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from taps.models.llama import Llama, LlamaConfig


def tiny_config(vocab_size: int = 49152, hidden: int = 64, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                       tie_word_embeddings=False)


def random_llama(cfg: LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> Llama:
    """Random weights; `scale` sharpens the output distribution (larger = more peaked)."""
    torch.manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            p.normal_(0.0, 0.02 if "embed" not in name else 1.0)
        model.lm_head.weight.mul_(scale)
    return model.to(dtype).eval().requires_grad_(False)


def save_hf_llama(model: Llama, directory: Path, tokenizer_from: Path | None = None) -> Path:
    """Write config.json + model.safetensors (HF key names); copy a tokenizer if given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.hidden_size,
          "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
          "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
          "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
          "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
          "head_dim": cfg.dim_head, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("rotary."):
            continue
        key = k if k.startswith("lm_head") else f"model.{k}"
        state[key] = v.detach().float().contiguous().clone()
    save_file(state, str(directory / "model.safetensors"))
    if tokenizer_from is not None:
        for f in Path(tokenizer_from).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
                shutil.copy(f, directory / f.name)
    return directory


def make_tiny_verifier_dir(directory: Path, seed: int = 0, with_tokenizer: bool = True, layers: int = 2,
                           scale: float = 1.0) -> Path:
    """A tiny random Llama in HF format using the default verifier's tokenizer (49152 tokens)."""
    tok_dir = None
    if with_tokenizer:
        from taps.models.loading import resolve_verifier

        tok_dir = resolve_verifier(None)[1]
    return save_hf_llama(random_llama(tiny_config(layers=layers), seed=seed, scale=scale), directory, tok_dir)
