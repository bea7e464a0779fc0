"""Drafter training: objectives (EAGLE-2, HASS alignment masking against an inference oracle),
feature shards, checkpoints, weight averaging, and train_drafter end to end (with and without Ray)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taps.averaging import average_checkpoints, average_state_dicts
from taps.models.drafter import DrafterConfig, DrafterMismatchError, EagleDrafter, load_drafter, save_drafter
from taps.models.llama import KVCache, build_mask, causal_mask
from tests.support import random_llama, tiny_config
from training.features import FeatureError, extract_features, load_features, verifier_hidden
from training.objectives import (ObjectiveConfig, alignment_mask, hass_features, next_step_inputs,
                                 objective_loss, training_pairs)

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
torch.set_num_threads(1)


class _Verifier:
    """The bits of taps.models.loading.Verifier that training uses."""

    def __init__(self, model, name="tiny"):
        from taps.models.loading import verifier_identity

        self.model, self.name = model, name
        self.identity = verifier_identity(name, model)


@pytest.fixture(scope="module")
def verifier():
    return _Verifier(random_llama(tiny_config(), seed=0, scale=4.0))


def make_drafter(v, seed=0, dtype=torch.float32, num_layers=1):
    torch.manual_seed(seed)
    cfg = DrafterConfig(name="t", domain="t", llama=v.model.config, verifier=v.identity, num_layers=num_layers)
    d = EagleDrafter(cfg, v.model.embed_tokens, v.model.lm_head)
    with torch.no_grad():
        for layer in d.decoder_layers:  # every layer from the verifier's last (nothing is the identity here)
            layer.load_state_dict(v.model.layers[-1].state_dict())
    return d.to(dtype)


def make_batch(v, b=2, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 2000, (t - 3 * i,), generator=g).tolist() for i in range(b)]
    hidden = verifier_hidden(v.model, seqs)
    out = {"input_ids": torch.zeros(b, t, dtype=torch.long), "hidden": torch.zeros(b, t, v.model.config.hidden_size,
                                                                                    dtype=torch.bfloat16),
           "loss_mask": torch.zeros(b, t, dtype=torch.uint8), "lengths": torch.tensor([len(s) for s in seqs])}
    for i, (s, h) in enumerate(zip(seqs, hidden)):
        out["input_ids"][i, :len(s)] = torch.tensor(s)
        out["hidden"][i, :len(s)] = h
        out["loss_mask"][i, 4:len(s)] = 1
    return out


# ---------------------------------------------------------------------- objectives

def test_alignment_mask_worked_examples():
    e = torch.tensor
    assert torch.equal(alignment_mask(1, 3), causal_mask(3))
    want2 = e([[0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1]]).bool()
    assert torch.equal(alignment_mask(2, 3), want2)
    want3 = e([[0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],  # query 0: only itself
               [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0],  # query 1: step-2 key 0, itself
               [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],  # query 2: target 0, step-2 key 1, itself
               [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]]).bool()  # query 3: target 0..1, step-2 key 2, itself
    assert torch.equal(alignment_mask(3, 4), want3)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["eagle2", "hass"])
def test_loss_falls_on_a_fixed_batch(verifier, objective):
    d = make_drafter(verifier)
    batch = make_batch(verifier)
    cfg = ObjectiveConfig.for_name(objective)
    opt = torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(20):
        out = objective_loss(d, batch, cfg, torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.75 * losses[0], losses
    assert all(torch.isfinite(torch.tensor(losses)))


def _inference_feature(d, tokens, inputs, preds, t, step):
    """Oracle: the drafter's output at position t of alignment step `step`, computed the way
    DrafterRunner drafts: a KV cache over the verified prefix (target features), then one draft
    node per level whose input feature is the previous level's prediction."""
    cache = d.new_cache(64)
    n = t - (step - 1) + 1  # verified pairs 0 .. t - step + 1
    with torch.no_grad():
        d(tokens[:, :n], inputs[:, :n], torch.arange(n)[None], cache, build_mask(causal_mask(n), 0))
        out = None
        for k in range(2, step + 1):
            pos = t - (step - k)
            feat = preds[k - 2][:, pos - 1:pos]  # step k-1's prediction at pos - 1
            out = d(tokens[:, pos:pos + 1], feat, torch.tensor([[pos]]), cache,
                    torch.ones(1, 1, 1, cache.length + 1, dtype=torch.bool))
    return out[0, -1]


@pytest.mark.parametrize("num_layers", [1, 2])
def test_hass_steps_equal_inference_drafting(verifier, num_layers):
    """Step j at position t equals a depth-j draft node at inference (the oracle above), for a one- or
    two-layer head."""
    d = make_drafter(verifier, num_layers=num_layers).eval()
    batch = make_batch(verifier, b=1)
    tokens, inputs, _, _ = training_pairs(batch)
    inputs = inputs.float()
    with torch.no_grad():
        preds = hass_features(d, tokens, inputs, steps=3)
    for step in (2, 3):
        for t in (step, 9, tokens.shape[1] - 1):
            want = _inference_feature(d, tokens, inputs, preds, t, step)
            torch.testing.assert_close(preds[step - 1][0, t], want, atol=1e-5, rtol=1e-4)


def test_hass_steps_see_their_own_predictions(verifier):
    """Perturbing the step-1 prediction that feeds position p of step 2 changes step 2 only at p and
    step 3 only at p + 1; step 1 (target features only) never changes."""
    d = make_drafter(verifier).eval()
    batch = make_batch(verifier, b=1)
    tokens, inputs, _, _ = training_pairs(batch)
    inputs = inputs.float()
    p = 7

    def perturb(step, x):
        if step == 2:
            x = x.clone()
            x[:, p] += 0.5
        return x

    with torch.no_grad():
        base = hass_features(d, tokens, inputs, 3)
        pert = hass_features(d, tokens, inputs, 3, perturb=perturb)
    changed = [(a - b).abs().amax(-1)[0] > 1e-6 for a, b in zip(base, pert)]
    assert not changed[0].any()
    assert changed[1].nonzero().flatten().tolist() == [p]
    assert changed[2].nonzero().flatten().tolist() == [p + 1]
    # and the step-2 input really is the step-1 prediction shifted by one
    torch.testing.assert_close(next_step_inputs(inputs[:, :1], base[0])[:, 1:], base[0][:, :-1])


def test_hass_gradient_reaches_earlier_step_keys(verifier):
    d = make_drafter(verifier)
    batch = make_batch(verifier)
    out = objective_loss(d, batch, ObjectiveConfig.for_name("hass", noise_std=0.0))
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters() if p.requires_grad)
    assert {"acc_step1", "acc_step2", "acc_step3", "topk_loss"} <= set(out)


def test_checkpoint_reloads_bit_exactly(verifier, tmp_path):
    d = make_drafter(verifier)
    opt = torch.optim.AdamW(d.parameters(), lr=1e-2)
    objective_loss(d, make_batch(verifier), ObjectiveConfig.for_name("eagle2"))["loss"].backward()
    opt.step()
    d.config.objective = "eagle2"
    save_drafter(d, tmp_path / "ck")
    back = load_drafter(tmp_path / "ck", verifier)
    a, b = d.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob("*.tmp*"))  # atomic: nothing left behind


# ---------------------------------------------------------------------- features

def test_feature_shards_resume_and_reject_corruption(verifier, tmp_path):
    g = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(0, 2000, (10 + i,), generator=g).tolist(),
                 "loss_mask": [0] * 5 + [1] * (5 + i)} for i in range(7)]
    out = extract_features(verifier, examples, tmp_path / "f", shard_size=3, batch_size=2, progress=False)
    fs = load_features([out], verifier.identity)
    assert len(fs) == 7 and fs.manifest["parts"][0]["tokens"] == sum(10 + i for i in range(7))
    # stored hidden states reproduce the verifier's logits through its lm_head
    h = verifier.model(torch.tensor([examples[3]["input_ids"]]), torch.arange(13)[None], None,
                       causal_mask(13)[None, None])[0]
    torch.testing.assert_close(fs.hidden[3].float(), h, atol=3e-2, rtol=1e-2)
    assert torch.equal(verifier.model.logits(fs.hidden[3].float()).argmax(-1), verifier.model.logits(h).argmax(-1))
    # a kill after shard 0: remove the rest and rerun -> identical shards, shard 0 not rewritten
    before = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    mtime0 = (out / "shard-00000.safetensors").stat().st_mtime_ns
    for p in [out / "manifest.json", out / "shard-00001.safetensors", out / "shard-00002.safetensors"]:
        p.unlink()
    with pytest.raises(FeatureError, match="did not finish"):
        load_features([out])
    extract_features(verifier, examples, out, shard_size=3, batch_size=2, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*")} == before
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == mtime0
    # a truncated shard is a clear error
    s1 = out / "shard-00001.safetensors"
    s1.write_bytes(s1.read_bytes()[:100])
    with pytest.raises(FeatureError, match="corrupt"):
        load_features([out])
    # another verifier's features are refused
    other = dict(verifier.identity, hidden_size=999)
    shutil.copy(tmp_path / "f" / "shard-00000.safetensors", tmp_path / "x.safetensors")
    s1.write_bytes(before["shard-00001.safetensors"])
    with pytest.raises(FeatureError, match="hidden_size"):
        load_features([out], other)


# ---------------------------------------------------------------------- averaging

def test_weight_averaging(verifier, tmp_path):
    a, b = make_drafter(verifier, seed=1), make_drafter(verifier, seed=2)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p))
    save_drafter(a, tmp_path / "a")
    save_drafter(b, tmp_path / "b")
    average_checkpoints([tmp_path / "a", tmp_path / "b"], [0.25, 0.75], tmp_path / "avg")
    avg = load_drafter(tmp_path / "avg", verifier)
    for k, v in avg.state_dict().items():
        torch.testing.assert_close(v, 0.25 * a.state_dict()[k] + 0.75 * b.state_dict()[k])
    cfg = json.loads((tmp_path / "avg" / "drafter.json").read_text())
    assert cfg["objective"] == "averaged" and [x["weight"] for x in cfg["training"]["averaged_from"]] == [0.25, 0.75]
    # three inputs, through the CLI
    save_drafter(make_drafter(verifier, seed=3), tmp_path / "c")
    r = subprocess.run([PY, "-m", "training.average", "--inputs", str(tmp_path / "a"), str(tmp_path / "b"),
                        str(tmp_path / "c"), "--weights", "0.2", "0.3", "0.5", "--out", str(tmp_path / "avg3")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert load_drafter(tmp_path / "avg3", verifier).config.name == "avg3"
    # refusals: bad weights, another verifier, other shapes
    with pytest.raises(ValueError, match="sum to 1"):
        average_checkpoints([tmp_path / "a", tmp_path / "b"], [0.5, 0.6], tmp_path / "bad")
    other = _Verifier(random_llama(tiny_config(), seed=5), name="other")
    save_drafter(make_drafter(other), tmp_path / "o")
    with pytest.raises(DrafterMismatchError):
        average_checkpoints([tmp_path / "a", tmp_path / "o"], [0.5, 0.5], tmp_path / "bad")
    save_drafter(make_drafter(verifier, num_layers=2), tmp_path / "deep")
    with pytest.raises(DrafterMismatchError, match="different drafter shape"):
        average_checkpoints([tmp_path / "a", tmp_path / "deep"], [0.5, 0.5], tmp_path / "bad")
    with pytest.raises(DrafterMismatchError):
        average_state_dicts([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [0.5, 0.5])
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------- train_drafter end to end

def _workspace(tmp_path):
    from training.prepare import make_tiny_workspace

    make_tiny_workspace(tmp_path)
    return tmp_path


def _train(root, *extra, check=True, config="training/configs/tiny.yaml"):
    r = subprocess.run([PY, "training/train_drafter.py", "--config", str(config), "--root",
                        str(root), "--no-ray", *extra], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    root = _workspace(tmp_path_factory.mktemp("tiny"))
    r = _train(root)
    return root, json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_drafter_tiny_without_ray(trained_tiny):
    from taps.compose import parse_strategy
    from taps.config import SamplingConfig, TreeConfig
    from taps.models.loading import load_verifier
    from taps.runtime import build_engine

    root, metrics = trained_tiny
    out = root / "runs" / "tiny" / "drafter"
    cfg = json.loads((out / "drafter.json").read_text())
    assert cfg["objective"] == "hass" and cfg["training"]["steps"] == 6 and metrics["step"] == 6
    assert cfg["training"]["final_loss"] == pytest.approx(metrics["loss"])
    v = load_verifier(str(root / "runs" / "tiny" / "verifier"))
    engine, info = build_engine(v, [f"tiny={out}"], TreeConfig(depth=3, top_k=2, total_tokens=6))
    assert info["tiny"]["trained"]
    res = engine.generate(v.encode_chat([{"role": "user", "content": "What is 2 + 3?"}]),
                          parse_strategy("single:tiny", ["tiny"]), SamplingConfig(), 8)
    assert len(res.token_ids) == 8


@pytest.mark.slow
def test_model_card_from_report_rows(trained_tiny, tmp_path):
    from training.evaluate import cli as evaluate_cli

    root, _ = trained_tiny
    out = root / "runs" / "tiny" / "drafter"
    rows = [{"strategy": "none", "dataset": "gsm_symbolic", "temperature": 0.0, "n_prompts": 1,
             "acceptance_length": 1.0, "speedup_vs_none": 1.0},
            {"strategy": "single:tiny", "dataset": "gsm_symbolic", "temperature": 0.0, "n_prompts": 1,
             "acceptance_length": 1.5, "speedup_vs_none": 0.8},
            {"strategy": "single:other", "dataset": "gsm_symbolic", "temperature": 0.0, "n_prompts": 1,
             "acceptance_length": 9.0, "speedup_vs_none": 9.0}]
    (tmp_path / "main.json").write_text(json.dumps({"rows": rows}))
    assert evaluate_cli(["--cards", str(out), "--rows", str(tmp_path / "main.json"), "--source", "a test"]) == 0
    card = (out / "README.md").read_text()
    assert "# Drafter `tiny`" in card and "| gsm_symbolic | 0.0 | 1 | 1.50 | 0.80x |" in card
    assert "9.00" not in card and "a test" in card and "s of training in all sessions" in card
    assert "steps: 6 " in card and "decoder layers: 1" in card


@pytest.mark.slow
def test_reduced_vocab_training_keeps_verifier_rows_frozen(tmp_path):
    """draft_head verifier-rows: the head stays the verifier's lm_head rows (exact targets), is not saved,
    and the reloaded drafter drafts over its token map."""
    import yaml

    from taps.models.drafter import load_drafter
    from taps.models.loading import load_verifier

    root = _workspace(tmp_path)
    cfg = yaml.safe_load((ROOT / "training" / "configs" / "tiny.yaml").read_text())
    token_map = sorted(torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:64].tolist())
    (root / "map.json").write_text(json.dumps({"size": 64, "token_ids": token_map}))
    cfg.update(draft_vocab_size=65, draft_vocab_map="map.json", draft_head="verifier-rows", objective="eagle2",
               objective_overrides={}, max_steps=2, output_dir="runs/tiny/reduced")
    (root / "reduced.yaml").write_text(yaml.safe_dump(cfg))
    r = _train(root, config=root / "reduced.yaml", check=False)  # the map's size must match draft_vocab_size
    assert r.returncode != 0 and "holds 64 tokens but draft_vocab_size is 65" in r.stderr
    cfg["draft_vocab_size"] = 64
    (root / "reduced.yaml").write_text(yaml.safe_dump(cfg))
    _train(root, config=root / "reduced.yaml")
    out = root / "runs" / "tiny" / "reduced"
    meta = json.loads((out / "drafter.json").read_text())
    assert meta["draft_vocab_size"] == 64 and meta["head"] == "verifier-rows"
    from safetensors.torch import load_file

    assert not any(k.startswith("lm_head") for k in load_file(out / "model.safetensors"))
    v = load_verifier(str(root / "runs" / "tiny" / "verifier"))
    d = load_drafter(out, v)
    torch.testing.assert_close(d.lm_head.weight.float(), v.model.lm_head.weight[d.d2t].float())
    assert d.d2t.tolist() == token_map  # the shared map, not this data's own top tokens

    # HASS fine-tuning of that drafter (init_from); a missing init_from is refused before any work
    cfg.update(objective="hass", objective_overrides={"steps": 2}, init_from="runs/tiny/nope",
               checkpoint_dir="runs/tiny/ckpt_hass", output_dir="runs/tiny/reduced_hass", max_steps=1)
    (root / "hass.yaml").write_text(yaml.safe_dump(cfg))
    r = _train(root, config=root / "hass.yaml", check=False)
    assert r.returncode == 2 and "is not a drafter directory" in r.stderr
    cfg["init_from"] = "runs/tiny/reduced"
    (root / "hass.yaml").write_text(yaml.safe_dump(cfg))
    r = _train(root, config=root / "hass.yaml")
    assert "initialised from" in r.stderr
    assert json.loads((root / "runs/tiny/reduced_hass/drafter.json").read_text())["objective"] == "hass"

    # continuing it on another token map: the frozen head's rows follow the new map, the trained weights carry over
    other = sorted(torch.randperm(4000, generator=torch.Generator().manual_seed(1))[:64].tolist())
    (root / "map2.json").write_text(json.dumps({"size": 64, "token_ids": other}))
    cfg.update(objective="eagle2", objective_overrides={}, draft_vocab_map="map2.json",
               checkpoint_dir="runs/tiny/ckpt_map2", output_dir="runs/tiny/map2", max_steps=1)
    (root / "map2.yaml").write_text(yaml.safe_dump(cfg))
    assert "initialised from" in _train(root, config=root / "map2.yaml").stderr
    d2 = load_drafter(root / "runs" / "tiny" / "map2", v)
    assert d2.d2t.tolist() == other
    torch.testing.assert_close(d2.lm_head.weight.float(), v.model.lm_head.weight[d2.d2t].float())
    # a two-layer head continuing it: the new layer starts as the identity; a deeper start than the config is refused
    cfg.update(draft_layers=2, checkpoint_dir="runs/tiny/ckpt_deep", output_dir="runs/tiny/deep", init_from="runs/tiny/map2")
    (root / "deep.yaml").write_text(yaml.safe_dump(cfg))
    assert "(1 of 2 decoder layers)" in _train(root, config=root / "deep.yaml").stderr
    assert load_drafter(root / "runs" / "tiny" / "deep", v).config.num_layers == 2
    cfg.update(draft_layers=1, checkpoint_dir="runs/tiny/ckpt_shallow", output_dir="runs/tiny/shallow",
               init_from="runs/tiny/deep")
    (root / "shallow.yaml").write_text(yaml.safe_dump(cfg))
    r = _train(root, config=root / "shallow.yaml", check=False)
    assert r.returncode != 0 and "has 2 decoder layers, more than draft_layers=1" in r.stderr
    cfg.update(init_from="runs/tiny/reduced", draft_layers=1)
    cfg.update(draft_head="own", output_dir="runs/tiny/map_own", checkpoint_dir="runs/tiny/ckpt_own")
    (root / "own.yaml").write_text(yaml.safe_dump(cfg))
    r = _train(root, config=root / "own.yaml", check=False)  # a trained head cannot change its map
    assert r.returncode != 0 and "another draft vocabulary" in r.stderr


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(trained_tiny, tmp_path):
    root_a, _ = trained_tiny
    root_b = _workspace(tmp_path)
    r = _train(root_b, "--stop-after-steps", "3", check=False)  # killed after step 3; last checkpoint: step 2
    assert r.returncode == 3, r.stderr[-2000:]
    assert not (root_b / "runs" / "tiny" / "drafter").exists()
    r = _train(root_b)
    assert "resumed from" in r.stderr and "at step 2" in r.stderr
    a = (root_a / "runs" / "tiny" / "drafter" / "model.safetensors").read_bytes()
    b = (root_b / "runs" / "tiny" / "drafter" / "model.safetensors").read_bytes()
    assert a == b  # bit-identical weights


@pytest.mark.slow
def test_time_budget_counts_earlier_sessions(tmp_path):
    """time_budget_s is the training time in all: a rerun after a kill trains only what is left of it."""
    root = _workspace(tmp_path)
    r = _train(root, "--stop-after-steps", "3", check=False)  # killed after step 3; last checkpoint: step 2
    assert r.returncode == 3, r.stderr[-2000:]
    spent = json.loads((root / "runs/tiny/checkpoints/tiny/local/step-000002/complete.json").read_text())
    assert spent["train_time_s"] > 0
    r = _train(root, "--set", f"time_budget_s={spent['train_time_s'] / 2}")
    assert "already spent" in r.stderr and json.loads(r.stdout.strip().splitlines()[-1])["step"] == 2
    meta = json.loads((root / "runs/tiny/drafter/drafter.json").read_text())["training"]
    assert meta["steps"] == 2 and meta["train_time_s"] >= spent["train_time_s"]


def test_features_extracted_per_conversation_file(tmp_path):
    """One feature directory per conversation file: adding a file extracts only that file."""
    from training.train_drafter import TrainConfig, prepare

    root = _workspace(tmp_path)
    lines = (root / "runs/tiny/conversations.jsonl").read_text().splitlines(keepends=True)
    (root / "a.jsonl").write_text("".join(lines[:3]))
    (root / "b.jsonl").write_text("".join(lines[3:5]))
    cfg = TrainConfig.load(ROOT / "training/configs/tiny.yaml", root)
    one = TrainConfig.from_dict({**cfg.to_dict(), "data": {"conversations": [str(root / "a.jsonl")],
                                                           "features": [str(root / "fa")]}})
    prepare(one)
    before = (root / "fa/manifest.json").read_bytes()
    both = TrainConfig.from_dict({**cfg.to_dict(), "data": {
        "conversations": [str(root / "a.jsonl"), str(root / "b.jsonl")],
        "features": [str(root / "fa"), str(root / "fb")]}})
    prepare(both)
    assert (root / "fa/manifest.json").read_bytes() == before  # untouched
    assert json.loads((root / "fb/manifest.json").read_text())["sequences"] == 2


def test_prepare_cli_extracts_ahead_of_training(tmp_path):
    """`python -m training.prepare` writes the directory a config names; training then extracts nothing."""
    from training.prepare import main as prepare_main
    from training.train_drafter import TrainConfig, prepare

    root = _workspace(tmp_path)
    lines = (root / "runs/tiny/conversations.jsonl").read_text().splitlines(keepends=True)
    (root / "b.jsonl").write_text("".join(lines[:4]))
    cfg = TrainConfig.load(ROOT / "training/configs/tiny.yaml", root)
    assert prepare_main(["--conversations", str(root / "b.jsonl"), "--features", str(root / "fb"), "--verifier",
                         str(root / "runs/tiny/verifier"), "--max-len", str(cfg.max_len), "--threads", "1"]) == 0
    manifest = (root / "fb/manifest.json").read_bytes()
    assert json.loads(manifest)["sequences"] == 4
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "data": {"conversations": [str(root / "b.jsonl")],
                                                           "features": [str(root / "fb")]}})
    prepare(cfg)
    assert (root / "fb/manifest.json").read_bytes() == manifest  # found complete, not extracted again


def test_bad_configs_fail_clearly(tmp_path):
    import yaml

    cfg = yaml.safe_load((ROOT / "training/configs/tiny.yaml").read_text())
    cfg["data"] = {"conversations": ["runs/nope.jsonl"]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([PY, "training/train_drafter.py", "--config", str(tmp_path / "bad.yaml"), "--root",
                        str(tmp_path), "--no-ray"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "nope.jsonl does not exist" in r.stderr
    cfg = yaml.safe_load((ROOT / "training/configs/tiny.yaml").read_text())
    cfg["objective"] = "medusa"
    (tmp_path / "bad2.yaml").write_text(yaml.safe_dump(cfg))
    _workspace(tmp_path)
    r = subprocess.run([PY, "training/train_drafter.py", "--config", str(tmp_path / "bad2.yaml"), "--root",
                        str(tmp_path), "--no-ray"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "objective must be one of" in r.stderr
    cfg["objective"], cfg["draft_layers"] = "eagle2", 0
    (tmp_path / "bad4.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([PY, "training/train_drafter.py", "--config", str(tmp_path / "bad4.yaml"), "--root",
                        str(tmp_path), "--no-ray"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "draft_layers must be at least 1" in r.stderr
    del cfg["draft_layers"]
    cfg["objective"], cfg["verifier"] = "hass", "runs/no_such_verifier"
    (tmp_path / "bad3.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([PY, "training/train_drafter.py", "--config", str(tmp_path / "bad3.yaml"), "--root",
                        str(tmp_path), "--no-ray"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "no_such_verifier' does not exist" in r.stderr


@pytest.mark.slow
def test_resume_refuses_another_verifiers_checkpoint(trained_tiny, tmp_path):
    from tests.support import make_tiny_verifier_dir

    root_a, _ = trained_tiny
    root_b = _workspace(tmp_path)
    shutil.rmtree(root_b / "runs" / "tiny" / "verifier")
    make_tiny_verifier_dir(root_b / "runs" / "tiny" / "verifier", seed=9)  # same shapes, other weights
    shutil.copytree(root_a / "runs" / "tiny" / "checkpoints" / "tiny" / "local",
                    root_b / "runs" / "tiny" / "checkpoints" / "tiny" / "local")
    shutil.copytree(root_a / "runs" / "tiny" / "checkpoints" / "tiny" / "features",
                    root_b / "runs" / "tiny" / "checkpoints" / "tiny" / "features")
    r = _train(root_b, check=False)
    assert r.returncode != 0 and "was made for verifier" in r.stderr


def test_training_does_nothing_at_import():
    code = ("import sys; import training.train_drafter as t; "
            "assert 'deepspeed' not in sys.modules and 'ray' not in sys.modules; assert callable(t.main)")
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_train_drafter_on_ray_train_two_workers(tmp_path):
    """Ray Train TorchTrainer + DeepSpeed (gloo) with 2 CPU workers on a local Ray; a rerun resumes."""
    ray = pytest.importorskip("ray")
    root = _workspace(tmp_path)
    code = (
        "import ray, json, sys; from pathlib import Path; "
        "from training.train_drafter import TrainConfig, main; "
        "ray.init(num_cpus=2, include_dashboard=False, runtime_env={'env_vars': {'DS_ACCELERATOR': 'cpu'}}); "
        f"cfg = TrainConfig.load('training/configs/tiny.yaml', Path({str(root)!r})); "
        "m = main(cfg, use_ray=True); print(json.dumps(m))"
    )
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "RAY_ADDRESS": ""})
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    out = root / "runs" / "tiny" / "drafter"
    cfg = json.loads((out / "drafter.json").read_text())
    assert cfg["training"]["workers"] == 2 and cfg["training"]["steps"] == 6
    assert list((root / "runs" / "tiny" / "checkpoints" / "tiny").glob("checkpoint_*"))
    del ray


@pytest.mark.slow
def test_snapshots_make_a_learning_curve(tmp_path):
    """snapshot_every_s exports the drafter during training; training.curve evaluates every snapshot and a
    compared drafter on the dev slice and draws the curve."""
    from training.curve import cli as curve_cli, snapshots

    root = _workspace(tmp_path)
    _train(root, "--set", "snapshot_every_s=0.001", "--set", "max_steps=4", "--set", "compute_dtype=auto")
    snaps = snapshots(root / "runs" / "tiny" / "checkpoints" / "tiny" / "snapshots")
    assert 2 <= len(snaps) <= 4 and [s[3] for s in snaps] == sorted({s[3] for s in snaps})
    assert all(b[2] >= a[2] for a, b in zip(snaps, snaps[1:]))  # whole seconds of training
    out = tmp_path / "curve.json"
    rc = curve_cli(["--snapshots", str(snaps[0][1].parent), "--compare", f"final={root / 'runs/tiny/drafter'}",
                    "--baseline", "final",
                    "--domain", "math", "--per-set", "1", "--max-new-tokens", "4", "--batch", "3", "--threads", "1",
                    "--verifier", str(root / "runs" / "tiny" / "verifier"), "--out", str(out),
                    "--plot", str(tmp_path / "curve.png")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [p["kind"] for p in res["points"]] == ["snapshot"] * len(snaps) + ["compare"]
    assert len({p["name"] for p in res["points"]}) == len(res["points"])
    assert all(len(p["vs_baseline"]) == 4 for p in res["points"][:-1]) and "vs_baseline" not in res["points"][-1]
    card = json.loads((root / "runs" / "tiny" / "drafter" / "drafter.json").read_text())
    assert card["training"]["compute_dtype"] in ("float32", "bfloat16")  # measured at start-up
    assert all(p["acceptance_length"] >= 1.0 and set(p["by_set"]) == {"gsm_symbolic", "mathematics", "svamp_like"}
               for p in res["points"])
    assert (tmp_path / "curve.png").stat().st_size > 1000
    rc = curve_cli(["--compare", f"final={root / 'runs/tiny/drafter'}", "--domain", "math", "--per-set", "1",
                    "--max-new-tokens", "4", "--threads", "1", "--temperature", "1",
                    "--verifier", str(root / "runs" / "tiny" / "verifier"), "--out", str(tmp_path / "curve_t1.json")])
    t1 = json.loads((tmp_path / "curve_t1.json").read_text())
    assert rc == 0 and t1["temperature"] == 1.0 and t1["points"][0]["acceptance_length"] >= 1.0
    rc = curve_cli(["--agreement", "--compare", f"final={root / 'runs/tiny/drafter'}", "--compare",
                    f"first={snaps[0][1]}", "--domain", "chat", "--per-set", "2", "--threads", "1",
                    "--verifier", str(root / "runs" / "tiny" / "verifier"), "--out", str(tmp_path / "agree.json")])
    agree = json.loads((tmp_path / "agree.json").read_text())
    assert rc == 0 and agree["prompts"] == 2 and agree["positions"] > 0
    assert set(agree["top1_agreement"]) == {"final", "first"}
    assert all(0.0 <= a <= 1.0 for a in agree["top1_agreement"].values())
