"""Train an EAGLE-2 / HASS drafter with DeepSpeed, on Ray Train (N workers) or in one process.

    ray start --head
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python training/train_drafter.py --config training/configs/math_eagle2.yaml --root $PWD
    python training/train_drafter.py --config training/configs/tiny.yaml --no-ray      # debugging

The drafter is the inference class (`taps.models.drafter.EagleDrafter`); the
verifier's embedding and lm_head are frozen (loaded in bf16: the logits of the
full vocabulary dominate the cost). The DeepSpeed config (`deepspeed:` in the
YAML) is the single source of optimizer and batch settings:
`train_micro_batch_size_per_gpu` sequences per worker and micro step,
`gradient_accumulation_steps`, `gradient_clipping`, `optimizer`, `scheduler`,
`zero_optimization.stage`.

Determinism: the data order of epoch e is a permutation seeded by (seed, e),
split across workers; the input noise of a micro step is seeded by (seed,
step, rank, micro). A resumed run therefore replays exactly the batches and
noise an uninterrupted run would have seen.

Checkpoints (DeepSpeed's own format, model + partitioned optimizer state) are
written every `checkpoint_every` optimizer steps: without Ray into
`checkpoint_dir/step-NNNNNN` (a temporary directory renamed when complete),
with Ray reported through `ray.train.report` into
`checkpoint_dir/<name>` (Ray Train registers a checkpoint only once every
worker has uploaded it). A rerun of the same command resumes from the
latest complete checkpoint. The final drafter is written with
`taps.models.drafter.save_drafter` (safetensors + drafter.json, atomic).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

if __package__ in (None, ""):  # run as `python training/train_drafter.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("train_drafter")


class TrainConfigError(ValueError):
    """A training config is missing something or names something that does not exist."""


@dataclass(frozen=True)
class DataConfig:
    features: tuple = ()  # feature directories (training/features.py); extracted from `conversations` if missing
    conversations: tuple = ()  # jsonl conversation files to tokenize and extract features from
    limit: int = 0  # use at most this many conversations (0: all)


@dataclass(frozen=True)
class TrainConfig:
    name: str  # drafter name (single:NAME)
    verifier: str = "default"  # verifier spec (taps.models.loading.resolve_verifier)
    domain: str = ""  # what it is trained on (defaults to name)
    objective: str = "eagle2"  # eagle2 | hass
    objective_overrides: dict = field(default_factory=dict)  # e.g. {steps: 3, topk: 10, noise_std: 0.2}
    data: DataConfig = DataConfig()
    max_len: int = 512  # tokens per training sequence (longer ones are truncated)
    epochs: int = 1  # passes over the data (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; 0: epochs decide
    draft_vocab_size: int = 0  # 0: full vocabulary through the verifier's lm_head
    init_from: str = ""  # start from this drafter's weights (e.g. HASS fine-tuning of an EAGLE-2 drafter)
    draft_vocab_map: str = ""  # JSON token map (training.reduce_vocab --map-out); "": top tokens of this data
    draft_head: str = "verifier-rows"  # reduced vocabulary: frozen verifier rows (exact targets) or "own" (trained)
    draft_layers: int = 1  # decoder layers in the head; layers beyond init_from's start as the identity
    seed: int = 0  # init, data order and noise
    num_workers: int = 2  # Ray Train workers (ignored with --no-ray)
    threads_per_worker: int = 1  # torch threads per worker
    device: str = "cpu"  # cpu (DeepSpeed CPU accelerator, gloo) or cuda (nccl)
    checkpoint_dir: str = "runs/checkpoints"  # where resumable checkpoints go
    checkpoint_every: int = 50  # optimizer steps between checkpoints
    keep_checkpoints: int = 2  # most recent checkpoints kept
    output_dir: str = "drafters/unnamed"  # the final drafter (safetensors + drafter.json)
    save_dtype: str = "bfloat16"  # dtype of the shipped weights
    log_every: int = 10  # optimizer steps between loss log lines
    deepspeed: dict = field(default_factory=dict)  # DeepSpeed config (or {"path": file.json})
    time_budget_s: float = 0.0  # stop (checkpoint, then save) after this much training time in all, counted
    # over resumed sessions (a rerun after a kill trains only what is left); 0: none
    snapshot_every_s: float = 0.0  # learning curve: export the drafter every this many seconds of training (all
    # sessions) to snapshot_dir/t<seconds>-s<step> (save_dtype, a few MB each; training.curve evaluates them); 0: off
    snapshot_dir: str = ""  # default: <checkpoint_dir>/<name>/snapshots
    compute_dtype: str = "auto"  # matmul dtype of the drafter's forward and backward (autocast; weights, optimizer
    # state and checkpoints stay float32): float32 | bfloat16 | auto (time a training step in each at start-up,
    # bfloat16 only when it wins by 10%: 2.2x faster on an AVX-512-BF16 EPYC, emulated and slower on AVX2-only CPUs)

    @classmethod
    def from_dict(cls, d: dict, root: Path | None = None) -> "TrainConfig":
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainConfigError(f"unknown config keys {unknown}; known: {sorted(known)}")
        if "name" not in d:
            raise TrainConfigError("config needs a drafter `name`")
        data = dict(d.pop("data", {}) or {})
        bad = sorted(set(data) - {"features", "conversations", "limit"})
        if bad:
            raise TrainConfigError(f"unknown data keys {bad}")
        root = Path(root or Path.cwd())

        def rel(p):
            return str(p if Path(p).is_absolute() else root / p)

        for k in ("features", "conversations"):
            if isinstance(data.get(k), str):
                data[k] = [data[k]]
            data[k] = tuple(rel(p) for p in data.get(k) or ())
        d["data"] = DataConfig(**data)
        for k in ("checkpoint_dir", "output_dir", "draft_vocab_map", "init_from", "snapshot_dir"):
            if d.get(k):
                d[k] = rel(d[k])
        v = d.get("verifier") or "default"
        if v != "default" and not Path(v).is_absolute() and (root / v).exists():
            d["verifier"] = rel(v)  # a local directory or .gguf file; otherwise a hub id
        looks_local = Path(v).is_absolute() or v.startswith(".") or v.endswith(".gguf") or \
            (root / Path(v).parts[0]).is_dir()
        if v != "default" and looks_local and not Path(rel(v)).exists():
            raise TrainConfigError(f"verifier {v!r} does not exist (resolved to {rel(v)})")
        ds = d.get("deepspeed") or {}
        if "path" in ds:
            p = Path(rel(ds["path"]))
            if not p.exists():
                raise TrainConfigError(f"deepspeed config {p} does not exist")
            d["deepspeed"] = json.loads(p.read_text())
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path, root: Path | None = None) -> "TrainConfig":
        import yaml

        p = Path(path)
        if not p.exists():
            raise TrainConfigError(f"config {p} does not exist")
        return cls.from_dict(yaml.safe_load(p.read_text()) or {}, root)

    def validate(self) -> None:
        from training.objectives import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise TrainConfigError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not self.data.features and not self.data.conversations:
            raise TrainConfigError("data needs `features` directories or `conversations` jsonl files")
        for p in self.data.conversations:
            if not Path(p).exists():
                raise TrainConfigError(f"conversation file {p} does not exist")
        if self.draft_vocab_map:
            p = Path(self.draft_vocab_map)
            if not p.exists():
                raise TrainConfigError(f"draft_vocab_map {p} does not exist (training.reduce_vocab --map-out)")
            try:
                n = len(json.loads(p.read_text())["token_ids"])
            except (ValueError, KeyError, TypeError) as e:
                raise TrainConfigError(f"draft_vocab_map {p} is not a token map ({e})") from e
            if n != self.draft_vocab_size:
                raise TrainConfigError(f"draft_vocab_map {p} holds {n} tokens but draft_vocab_size is "
                                       f"{self.draft_vocab_size}")
        if self.init_from and not (Path(self.init_from) / "drafter.json").exists():
            raise TrainConfigError(f"init_from {self.init_from} is not a drafter directory (no drafter.json)")
        if self.draft_layers < 1:
            raise TrainConfigError(f"draft_layers must be at least 1, got {self.draft_layers}")
        if self.draft_head not in ("own", "verifier-rows"):
            raise TrainConfigError(f"draft_head must be 'own' or 'verifier-rows', got {self.draft_head!r}")
        if self.max_len < 8 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise TrainConfigError("max_len >= 8, checkpoint_every >= 1 and keep_checkpoints >= 1 required")
        if self.epochs < 1 and self.max_steps < 1:
            raise TrainConfigError("train for epochs >= 1 or max_steps >= 1")
        ds = self.ds_config()
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise TrainConfigError(f"zero_optimization.stage must be 0..3, got {stage}")
        if "optimizer" not in ds:
            raise TrainConfigError("the deepspeed config needs an `optimizer` section")
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise TrainConfigError(f"compute_dtype must be auto, float32 or bfloat16, got {self.compute_dtype!r}")
        if self.snapshot_every_s < 0:
            raise TrainConfigError(f"snapshot_every_s must be >= 0, got {self.snapshot_every_s}")
        if self.save_dtype not in ("bfloat16", "float16", "float32"):
            raise TrainConfigError(f"save_dtype must be bfloat16, float16 or float32, got {self.save_dtype!r}")

    def ds_config(self) -> dict:
        ds = json.loads(json.dumps(self.deepspeed))  # a copy
        ds.setdefault("train_micro_batch_size_per_gpu", 4)
        ds.setdefault("gradient_accumulation_steps", 1)
        ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x world
        if self.device == "cpu":  # DeepSpeed's fused CPU Adam is compiled on first use (minutes)
            ds.get("optimizer", {}).setdefault("params", {}).setdefault("torch_adam", True)
        return ds

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["data"].items()}
        return d

    @property
    def snapshots(self) -> Path:
        return Path(self.snapshot_dir or Path(self.checkpoint_dir) / self.name / "snapshots")

    @property
    def feature_dirs(self) -> list[str]:
        if self.data.features:
            return list(self.data.features)
        return [str(Path(self.checkpoint_dir) / self.name / "features")]


# ---------------------------------------------------------------------- data plan

def epoch_batches(n: int, epoch: int, seed: int, rank: int, world: int, micro: int) -> list[list[int]]:
    """Sequence indices of each micro batch of this worker in `epoch` (same count on every worker)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_worker = n // world
    mine = perm[rank * per_worker:(rank + 1) * per_worker]
    return [mine[i:i + micro] for i in range(0, len(mine) - micro + 1, micro)]


# ---------------------------------------------------------------------- the worker

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _latest_local_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step-*") if ".tmp" not in p.name and (p / "complete.json").exists())
    return done[-1] if done else None


def pick_compute_dtype(name: str, loss_fn, module, repeats: int = 2):
    """float32 or bfloat16 for the training matmuls. `auto` times forward + backward of one batch
    (`loss_fn(dtype)` -> {"loss"}) in each, gradients discarded, and keeps float32 unless bfloat16 wins
    by 10% (taps.costmodel.pick_fastest): a choice measured on this machine, not assumed."""
    import torch

    from taps.costmodel import describe_times, pick_fastest

    if name != "auto":
        return getattr(torch, name)
    seconds = {}
    for dt in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):  # warm-up pass, then timed
        t0 = time.perf_counter()
        for _ in range(repeats):
            loss_fn(dt)["loss"].backward()
        seconds[dt] = (time.perf_counter() - t0) / repeats
        module.zero_grad(set_to_none=True)
    choice = pick_fastest(seconds, 1.1)
    log.info("compute_dtype auto: %s (a training step: %s)", str(choice).replace("torch.", ""),
             describe_times(seconds))
    return choice


def draft_token_ids(cfg: TrainConfig, feats, vocab_size: int):
    """The reduced draft vocabulary of a config: its shared map (drafters trained on one map can be
    weight-averaged), else the most frequent tokens of its training features (EAGLE-3 style); None for
    the full vocabulary."""
    import torch

    if cfg.draft_vocab_map:
        return torch.tensor(json.loads(Path(cfg.draft_vocab_map).read_text())["token_ids"], dtype=torch.long)
    if cfg.draft_vocab_size:
        counts = torch.bincount(torch.cat(feats.input_ids), minlength=vocab_size)
        return counts.topk(cfg.draft_vocab_size).indices.sort().values
    return None


def train_worker(cfg_dict: dict) -> dict:
    """One training worker (rank r of world w). Runs inside Ray Train or alone (--no-ray)."""
    cfg = TrainConfig.from_dict({**cfg_dict["cfg"], "data": cfg_dict["cfg"]["data"]})
    use_ray = cfg_dict["use_ray"]
    stop_after = cfg_dict.get("stop_after_steps")
    if cfg.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    torch.set_num_threads(cfg.threads_per_worker)
    import deepspeed
    import torch.distributed as dist

    from taps.models.drafter import load_drafter, new_drafter, save_drafter
    from taps.models.loading import load_verifier
    from training.features import load_features
    from training.objectives import ObjectiveConfig, objective_loss

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if use_ray:
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    else:
        rank, world = 0, 1
        if not dist.is_initialized():
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend="gloo" if cfg.device == "cpu" else "nccl", verbose=False)

    device = torch.device(cfg.device if cfg.device == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    verifier = load_verifier(cfg.verifier, dtype=torch.bfloat16, device=device, with_tokenizer=False)
    feats = load_features(cfg.feature_dirs, verifier.identity)
    token_ids = draft_token_ids(cfg, feats, verifier.model.config.vocab_size)
    drafter = new_drafter(cfg.name, verifier, domain=cfg.domain or cfg.name, draft_vocab_size=cfg.draft_vocab_size,
                          seed=cfg.seed, token_ids=token_ids, head=cfg.draft_head, num_layers=cfg.draft_layers)
    if cfg.init_from:  # same shape required (load_drafter checks the verifier); the token map too, unless the head
        # is frozen verifier rows: then only the map differs and the new map's rows come from the verifier
        src = load_drafter(cfg.init_from, verifier)
        rows_head = cfg.draft_head == "verifier-rows"
        if src.config.draft_vocab_size != cfg.draft_vocab_size or (
                not rows_head and src.d2t is not None and not torch.equal(src.d2t.cpu(), drafter.d2t.cpu())):
            raise TrainConfigError(f"init_from {cfg.init_from} has another draft vocabulary than this config")
        if src.config.num_layers > cfg.draft_layers:
            raise TrainConfigError(f"init_from {cfg.init_from} has {src.config.num_layers} decoder layers, more than "
                                   f"draft_layers={cfg.draft_layers}")
        state = {k: v for k, v in src.state_dict().items() if not (rows_head and k in ("lm_head.weight", "d2t"))}
        res = drafter.load_state_dict(state, strict=False)
        missing = [k for k in res.missing_keys if k not in ("lm_head.weight", "d2t")
                   and not k.startswith("extra_layers.")]  # a deeper head: its new layers stay the identity
        if missing or res.unexpected_keys:
            raise TrainConfigError(f"init_from {cfg.init_from}: missing {missing}, unexpected {res.unexpected_keys}")
        log.info("initialised from %s (%d of %d decoder layers)", cfg.init_from, src.config.num_layers, cfg.draft_layers)
    drafter = drafter.to(torch.float32).train()
    if cfg.draft_vocab_size and cfg.draft_head == "verifier-rows":
        drafter.lm_head.requires_grad_(False)  # .to() keeps the flag; stated for clarity
    ocfg = ObjectiveConfig.for_name(cfg.objective, **cfg.objective_overrides)

    ds = cfg.ds_config()
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    n_micro = len(epoch_batches(len(feats), 0, cfg.seed, rank, world, micro))
    steps_per_epoch = n_micro // accum
    if steps_per_epoch < 1:
        raise TrainConfigError(f"{len(feats)} sequences are too few for {world} workers x micro batch {micro} "
                               f"x accumulation {accum}")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    sched = ds.get("scheduler", {}).get("params")
    if sched is not None and "total_num_steps" in sched and not sched["total_num_steps"]:
        sched["total_num_steps"] = total  # WarmupDecayLR: decay over the whole run
    params = [p for p in drafter.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=drafter, model_parameters=params, config=ds)

    # ------------------------------------------------------------ resume
    start = 0
    resumed_from = None
    client: dict = {}  # the resumed checkpoint's client state
    local_root = Path(cfg.checkpoint_dir) / cfg.name / "local"
    def check_identity(d: Path) -> None:
        f = Path(d) / "taps_checkpoint.json"
        if not f.exists():
            raise TrainConfigError(f"{d} is not a complete drafter training checkpoint (no {f.name})")
        want = json.loads(f.read_text())["verifier"]
        got = verifier.identity
        if any(want.get(k) != got.get(k) for k in ("hidden_size", "vocab_size", "num_hidden_layers")) or \
                any(abs(a - b) > 1e-2 * max(1.0, abs(a)) for a, b in zip(want["fingerprint"], got["fingerprint"])):
            raise TrainConfigError(f"checkpoint {d} was made for verifier {want.get('name')!r}, not for "
                                   f"{got.get('name')!r}: use another checkpoint_dir")

    if use_ray:
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                check_identity(Path(d))
                _, client = engine.load_checkpoint(d, tag="ds")
                start, resumed_from = int(client["step"]), str(ckpt.path)
    else:
        for stale in local_root.glob("step-*.tmp*"):  # a save interrupted before its rename
            shutil.rmtree(stale, ignore_errors=True)
        latest = _latest_local_checkpoint(local_root)
        if latest is not None:
            check_identity(latest)
            _, client = engine.load_checkpoint(str(latest), tag="ds")
            start, resumed_from = int(client["step"]), str(latest)
    prior_s = float(client.get("train_time_s", 0.0))  # earlier sessions (checkpoints before this field: 0)
    if resumed_from and rank == 0:
        log.info("resumed from %s at step %d / %d after %.0f s of training", resumed_from, start, total, prior_s)

    def save_checkpoint(step: int, metrics: dict, final_drafter: bool = False) -> None:
        client = {"step": step, "metrics": metrics, "train_time_s": trained_s(),
                  "compute_dtype": str(compute).replace("torch.", "")}
        if use_ray:
            tmp = Path(tempfile.mkdtemp(prefix=f"taps-ckpt-{cfg.name}-r{rank}-"))
            engine.save_checkpoint(str(tmp), tag="ds", client_state=client)
            if rank == 0:
                (tmp / "taps_checkpoint.json").write_text(json.dumps({"step": step, "verifier": verifier.identity}))
            if final_drafter and rank == 0:
                export(tmp / "drafter", step, metrics)
            from ray.train import Checkpoint

            ray.train.report({**metrics, "step": step}, checkpoint=Checkpoint.from_directory(str(tmp)))
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            local_root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=local_root, prefix=f"step-{step:06d}.tmp"))
            engine.save_checkpoint(str(tmp), tag="ds", client_state=client)
            (tmp / "taps_checkpoint.json").write_text(json.dumps({"step": step, "verifier": verifier.identity}))
            (tmp / "complete.json").write_text(json.dumps(client))
            final = local_root / f"step-{step:06d}"
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(p for p in local_root.glob("step-*") if ".tmp" not in p.name)[:-cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    def export(directory: Path, step: int, metrics: dict) -> None:
        import copy

        out = copy.deepcopy(engine.module).to(getattr(torch, cfg.save_dtype)).eval()
        out.config.objective = cfg.objective
        out.config.training = {
            "objective": cfg.objective, "objective_config": asdict(ocfg), "data": cfg.to_dict()["data"],
            "sequences": len(feats), "tokens": int(sum(len(x) for x in feats.input_ids)),
            "assistant_tokens": int(sum(int(m.sum()) for m in feats.loss_mask)),
            "steps": step, "epochs": round(step / steps_per_epoch, 3), "workers": world,
            "micro_batch": micro, "gradient_accumulation_steps": accum, "max_len": cfg.max_len,
            "final_loss": metrics.get("loss"), "final_acc": metrics.get("acc"), "seed": cfg.seed,
            "wall_time_s": metrics.get("wall_time_s"), "train_time_s": trained_s(), "deepspeed": ds,
            "compute_dtype": str(compute).replace("torch.", ""),
            "config": cfg.to_dict(),
        }
        save_drafter(out, directory)

    # ------------------------------------------------------------ compute dtype
    def loss_of(batch_idx: list[int], g, dtype) -> dict:
        batch = {k: v.to(device) for k, v in feats.batch(batch_idx, cfg.max_len).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return objective_loss(engine.module, batch, ocfg, g)

    def probe_loss(dt):  # on a copy: no DeepSpeed gradient hooks, no effect on the run
        batch = {k: v.to(device) for k, v in
                 feats.batch(epoch_batches(len(feats), 0, cfg.seed, rank, world, micro)[0], cfg.max_len).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dt == torch.bfloat16):
            return objective_loss(probe, batch, ocfg, torch.Generator().manual_seed(0))

    name = cfg.compute_dtype
    if name == "auto" and client.get("compute_dtype"):  # a resumed run keeps the first session's choice
        name = client["compute_dtype"]
    if name == "auto":
        import copy

        probe = copy.deepcopy(engine.module)
        compute = pick_compute_dtype(name, probe_loss, probe)
        del probe
    else:
        compute = getattr(torch, name)
    if world > 1:  # every rank must use the same dtype (rank 0 decides)
        flag = torch.tensor([1.0 if compute == torch.bfloat16 else 0.0])
        dist.broadcast(flag, 0)
        compute = torch.bfloat16 if flag.item() else torch.float32
    if rank == 0:
        log.info("compute dtype %s", str(compute).replace("torch.", ""))

    # ------------------------------------------------------------ loop
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc=f"train {cfg.name} ({cfg.objective})", disable=rank != 0,
               file=sys.stderr, mininterval=2.0)
    t0 = time.perf_counter()

    def trained_s() -> float:  # training time of all sessions so far
        return round(prior_s + time.perf_counter() - t0, 1)

    metrics: dict = {}
    window: list[dict] = []
    step = start
    snapped = int(prior_s // cfg.snapshot_every_s) if cfg.snapshot_every_s else 0  # snapshots already taken
    plan_epoch, plan = -1, []
    if cfg.time_budget_s and prior_s >= cfg.time_budget_s:
        log.info("time budget of %.0f s already spent (%.0f s): no more steps", cfg.time_budget_s, prior_s)
        total = step
    while step < total:
        epoch = step // steps_per_epoch
        if epoch != plan_epoch:
            plan_epoch, plan = epoch, epoch_batches(len(feats), epoch, cfg.seed, rank, world, micro)
        within = step % steps_per_epoch
        for a in range(accum):
            g = torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 64 + rank) * 16 + a)
            out = loss_of(plan[within * accum + a], g, compute)
            engine.backward(out["loss"])
            engine.step()
            window.append({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()})
        step += 1
        bar.update(1)
        elapsed = time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == total:
            metrics = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            # average over workers, so every rank reports the same numbers
            vals = torch.tensor([metrics[k] for k in sorted(metrics)], dtype=torch.float64)
            dist.all_reduce(vals)
            metrics = {k: float(v) / world for k, v in zip(sorted(metrics), vals)}
            metrics["wall_time_s"] = round(elapsed, 1)
            window = []
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics.get('acc', 0):.3f}")
            if rank == 0:
                log.info("step %d/%d %s", step, total, " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        if cfg.snapshot_every_s and rank == 0 and int((prior_s + elapsed) // cfg.snapshot_every_s) > snapped:
            snapped = int((prior_s + elapsed) // cfg.snapshot_every_s)
            export(cfg.snapshots / f"t{int(prior_s + elapsed):06d}-s{step:06d}", step,
                   {**(metrics or {}), "wall_time_s": round(elapsed, 1)})
        out_of_time = bool(cfg.time_budget_s) and prior_s + elapsed > cfg.time_budget_s
        if out_of_time:  # every rank must agree before the collective checkpoint
            flag = torch.tensor([1.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            out_of_time = bool(flag.item())
        if step % cfg.checkpoint_every == 0 and step < total and not out_of_time:
            save_checkpoint(step, metrics or {"loss": float("nan")})
        if stop_after is not None and step >= stop_after:
            log.warning("stopping after step %d (--stop-after-steps: simulated kill)", step)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
        if out_of_time:
            log.info("time budget of %.0f s reached at step %d (%.0f s in this session)", cfg.time_budget_s, step,
                     elapsed)
            break
    bar.close()
    if not metrics and window:
        metrics = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
    metrics.setdefault("wall_time_s", round(time.perf_counter() - t0, 1))
    if use_ray:
        save_checkpoint(step, metrics, final_drafter=True)
    else:
        save_checkpoint(step, metrics)
        export(Path(cfg.output_dir), step, metrics)
    return {"step": step, **metrics}


# ---------------------------------------------------------------------- driver

def prepare(cfg: TrainConfig) -> None:
    """Extract features for `data.conversations` once (resumable) before training starts: all of them into
    the first feature directory, or, with one feature directory per conversation file (and no
    `data.limit`), each file into its own directory, so adding a file to a drafter extracts only that file."""
    if cfg.data.features:
        missing = [p for p in cfg.data.features if not (Path(p) / "manifest.json").exists()]
        if missing and not cfg.data.conversations:
            raise TrainConfigError(f"feature directories {missing} are missing or incomplete "
                                   f"(extract them with `python -m training.prepare` or give data.conversations)")
        if not missing:
            return
    paired = len(cfg.data.conversations) == len(cfg.data.features) > 1 and not cfg.data.limit
    jobs = [([c], f) for c, f in zip(cfg.data.conversations, cfg.data.features) if f in missing] if paired else \
        [(list(cfg.data.conversations), cfg.feature_dirs[0])]
    if cfg.device == "cpu":
        import torch

        torch.set_num_threads(max(1, cfg.threads_per_worker * max(1, cfg.num_workers)))
    from taps.models.loading import load_verifier
    from training.prepare import prepare_features
    import torch

    verifier = load_verifier(cfg.verifier, dtype=torch.bfloat16)
    for conversations, directory in jobs:
        prepare_features(verifier, conversations, directory, cfg.max_len, limit=cfg.data.limit or None)


def run_ray(cfg: TrainConfig) -> dict:
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto") if os.environ.get("RAY_ADDRESS") else None)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "use_ray": True},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.device != "cpu",
                                     resources_per_worker={"CPU": cfg.threads_per_worker}),
        torch_config=TorchConfig(backend="gloo" if cfg.device == "cpu" else "nccl"),
        run_config=RunConfig(name=cfg.name, storage_path=str(Path(cfg.checkpoint_dir).resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        src = Path(d) / "drafter"
        if not (src / "drafter.json").exists():
            raise RuntimeError(f"the final checkpoint {result.checkpoint.path} holds no drafter")
        out = Path(cfg.output_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    return dict(result.metrics or {})


def main(cfg: TrainConfig, use_ray: bool = True, stop_after_steps: int | None = None) -> dict:
    """Prepare features, train, and write the drafter to cfg.output_dir; returns the final metrics."""
    prepare(cfg)
    if use_ray:
        metrics = run_ray(cfg)
    else:
        metrics = train_worker({"cfg": cfg.to_dict(), "use_ray": False, "stop_after_steps": stop_after_steps})
    log.info("drafter %s written to %s: %s", cfg.name, cfg.output_dir, json.dumps(metrics))
    return metrics


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="training/configs/<name>.yaml")
    ap.add_argument("--root", default=None, help="directory that relative paths in the config are relative to "
                    "(default: the current directory; pass $PWD under `ray job submit --working-dir .`)")
    ap.add_argument("--no-ray", action="store_true", help="train in this process (debugging)")
    ap.add_argument("--max-steps", type=int, default=None, help="override max_steps")
    ap.add_argument("--output", default=None, help="override output_dir (where the final drafter is written)")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="override device (cuda on GPU workers)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config field (value parsed as YAML), e.g. --set time_budget_s=420; repeatable")
    ap.add_argument("--stop-after-steps", type=int, default=None,
                    help="fault injection for tests: exit hard after this many steps (--no-ray only)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = TrainConfig.load(args.config, Path(args.root) if args.root else None)
        overrides = {k: v for k, v in (("max_steps", args.max_steps), ("output_dir", args.output),
                                        ("device", args.device)) if v is not None}
        import yaml

        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise TrainConfigError(f"--set expects KEY=VALUE, got {item!r}")
            overrides[key] = yaml.safe_load(value)
        if overrides:
            cfg = TrainConfig.from_dict({**cfg.to_dict(), **overrides})
    except TrainConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from training.features import FeatureError
    from training.prepare import DataError

    try:
        metrics = main(cfg, use_ray=not args.no_ray, stop_after_steps=args.stop_after_steps)
    except (TrainConfigError, FeatureError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output_dir": cfg.output_dir, **metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
