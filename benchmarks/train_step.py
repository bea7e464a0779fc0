"""What a training step costs, for drafter shapes side by side: the exchange rate behind "equal budget".

    python benchmarks/train_step.py --config training/configs/math_2layer_eagle2.yaml --layers 1 2

Times forward + backward + AdamW of the config's objective on the same micro batches of its features, one
shape after the other per batch (interleaved, so machine noise lands on both), at the config's threads per
worker and compute dtype (bfloat16 under autocast unless the config says float32). Prints the median
seconds per step of each shape and their ratio; `--json` writes them. A run on a shared machine gives the
ratio, not absolute speed: a budget of N one-layer steps equals N / ratio two-layer steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="a training config (data, objective, vocabulary)")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="decoder layers of each shape timed")
    ap.add_argument("--steps", type=int, default=24, help="micro batches timed per shape (after 2 warm-up)")
    ap.add_argument("--json", default="", help="write the figures here")
    args = ap.parse_args(argv)

    import torch

    from taps.models.drafter import new_drafter
    from taps.models.loading import load_verifier
    from training.features import load_features
    from training.objectives import ObjectiveConfig, objective_loss
    from training.train_drafter import TrainConfig, draft_token_ids, epoch_batches

    cfg = TrainConfig.load(args.config, ROOT)
    torch.set_num_threads(cfg.threads_per_worker)
    verifier = load_verifier(cfg.verifier, dtype=torch.bfloat16, with_tokenizer=False)
    feats = load_features(cfg.feature_dirs, verifier.identity)
    token_ids = draft_token_ids(cfg, feats, verifier.model.config.vocab_size)
    ocfg = ObjectiveConfig.for_name(cfg.objective, **cfg.objective_overrides)
    bf16 = cfg.compute_dtype != "float32"
    micro = cfg.ds_config()["train_micro_batch_size_per_gpu"]
    batches = epoch_batches(len(feats), 0, cfg.seed, 0, 1, micro)[:args.steps + 2]
    shapes = {}
    for n in args.layers:
        d = new_drafter(f"l{n}", verifier, draft_vocab_size=cfg.draft_vocab_size, token_ids=token_ids,
                        head=cfg.draft_head, num_layers=n).to(torch.float32).train()  # verifier-rows: frozen
        params = [p for p in d.parameters() if p.requires_grad]
        shapes[n] = (d, torch.optim.AdamW(params, lr=1e-5), [])
    for i, idx in enumerate(batches):
        batch = feats.batch(idx, cfg.max_len)
        for n, (d, opt, times) in shapes.items():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = objective_loss(d, batch, ocfg, torch.Generator().manual_seed(i))["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, (_, _, t) in shapes.items()}
    base = med[args.layers[0]]
    for n, s in med.items():
        print(f"{n} decoder layer(s): {s * 1000:.1f} ms per step (median of {args.steps}), "
              f"{s / base:.2f}x the {args.layers[0]}-layer step")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "objective": cfg.objective, "bf16": bf16,
                                               "threads": cfg.threads_per_worker, "steps": args.steps,
                                               "median_s": {str(n): s for n, s in med.items()},
                                               "ratio": {str(n): s / base for n, s in med.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
