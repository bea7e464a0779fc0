"""Drafter actors stay light: the drafter is built from the verifier parts it reads
(load_verifier_parts), bit-identical to the one built from the whole verifier; the actor reports
to its registry through a heartbeat callback (no cluster, no redis); actor options fit any machine."""

import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from taps.config import TreeConfig
from taps.drafting import DrafterRunner
from taps.models.drafter import DrafterMismatchError, load_drafter, new_drafter, save_drafter, with_reduced_vocab
from taps.models.llama import causal_mask
from taps.models.loading import VerifierParts, load_verifier, load_verifier_parts, verifier_config
from taps.runtime import DrafterSpec, build_drafter
from tests.support import random_llama, save_hf_llama, tiny_config

REPO = Path(__file__).resolve().parents[2]
V, H = 97, 32


def _save_verifier(directory: Path, tied: bool = False, sharded: bool = False, seed: int = 3) -> Path:
    cfg = dataclasses.replace(tiny_config(vocab_size=V, hidden=H, layers=3), tie_word_embeddings=tied)
    save_hf_llama(random_llama(cfg, seed=seed), directory)
    if tied:  # as transformers saves a tied model: no lm_head tensor
        with safe_open(str(directory / "model.safetensors"), framework="pt") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys() if k != "lm_head.weight"}
        save_file(state, str(directory / "model.safetensors"))
    if sharded:  # two shards and an index, the embedding and the lm_head in different files
        with safe_open(str(directory / "model.safetensors"), framework="pt") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}
        (directory / "model.safetensors").unlink()
        first = {k: v for k, v in state.items() if k.startswith("model.embed") or "layers.0." in k}
        shards = {"model-00001-of-00002.safetensors": first,
                  "model-00002-of-00002.safetensors": {k: v for k, v in state.items() if k not in first}}
        for f, part in shards.items():
            save_file(part, str(directory / f))
        weight_map = {k: f for f, part in shards.items() for k in part}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def _assert_same_drafter(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for fa, fb in ((a.embed_tokens, b.embed_tokens), (a.verifier_lm_head, b.verifier_lm_head)):
        assert fa.weight.dtype == fb.weight.dtype and torch.equal(fa.weight, fb.weight)
    assert a.config == b.config
    torch.manual_seed(0)
    tokens, positions = torch.randint(0, V, (1, 5)), torch.arange(5)[None]
    hidden = torch.randn(1, 5, H)
    with torch.no_grad():
        fa = a(tokens, hidden, positions, None, causal_mask(5)[None, None])
        fb = b(tokens, hidden, positions, None, causal_mask(5)[None, None])
        assert torch.equal(fa, fb) and torch.equal(a.draft_logits(fa), b.draft_logits(fb))
    cfg = TreeConfig(depth=3, top_k=2, total_tokens=7)
    ta = DrafterRunner(a).draft("r", tokens[0], hidden[0], cfg)
    tb = DrafterRunner(b).draft("r", tokens[0], hidden[0], cfg)
    assert torch.equal(ta.tokens, tb.tokens) and torch.equal(ta.parents, tb.parents)


@pytest.mark.parametrize("tied,sharded", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drafter_from_parts_is_bit_identical(tmp_path, tied, sharded, dtype):
    vdir = _save_verifier(tmp_path / "v", tied=tied, sharded=sharded)
    full = load_verifier(str(vdir), dtype=dtype, with_tokenizer=False)
    parts = load_verifier_parts(str(vdir), dtype=dtype)
    assert isinstance(parts, VerifierParts) and parts.name == full.name and parts.directory == full.directory
    assert parts.identity == full.identity and parts.model.config == full.model.config
    assert (parts.model.lm_head.weight is parts.model.embed_tokens.weight) == tied
    assert len(parts.model.layers) == 3 and not parts.model.layers._loaded  # layers are read lazily

    # random-init (starts from the verifier's last layer), as the actor builds it
    _assert_same_drafter(build_drafter(DrafterSpec("x", None), full, seed=2),
                         build_drafter(DrafterSpec("x", None), parts, seed=2))
    assert list(parts.model.layers._loaded) == [2]  # only the last layer was read

    # checkpoints: full vocabulary, an own reduced head, a verifier-rows head (rebuilt from lm_head rows)
    src = new_drafter("x", full, seed=5, draft_vocab_size=0)
    keep = torch.arange(0, V, 2)
    own = new_drafter("x", full, seed=6, draft_vocab_size=keep.numel(), token_ids=keep)
    rows = with_reduced_vocab(src, keep)
    assert rows.config.head == "verifier-rows"
    for i, d in enumerate((src, own, rows)):
        save_drafter(d, tmp_path / f"d{i}")
        for ddt in (None, torch.bfloat16):
            _assert_same_drafter(build_drafter(DrafterSpec("x", tmp_path / f"d{i}"), full, dtype=ddt),
                                 build_drafter(DrafterSpec("x", tmp_path / f"d{i}"), parts, dtype=ddt))


def test_parts_refuse_another_verifiers_drafter(tmp_path):
    mine = load_verifier(str(_save_verifier(tmp_path / "a", seed=3)), with_tokenizer=False)
    save_drafter(new_drafter("x", mine, seed=1), tmp_path / "d")
    other = load_verifier_parts(str(_save_verifier(tmp_path / "b", seed=4)))
    with pytest.raises(DrafterMismatchError, match="fingerprint"):
        load_drafter(tmp_path / "d", other)
    assert load_drafter(tmp_path / "d", load_verifier_parts(str(tmp_path / "a"))) is not None
    assert verifier_config(str(tmp_path / "a")).hidden_size == H


def test_drafter_actor_module_imports_neither_cluster_nor_redis():
    code = ("import sys, actors.drafter_actor; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('cluster', 'redis')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    src = (REPO / "actors" / "drafter_actor.py").read_text()
    assert "import redis" not in src and "from cluster" not in src and "import cluster" not in src


class _Recorder:
    def __init__(self, fail: bool = False):
        self.calls: list[tuple] = []
        self.fail = fail
        self.beat = threading.Event()

    def __call__(self, name, replica_id, address):
        self.calls.append((name, replica_id, address))
        if len(self.calls) >= 3:
            self.beat.set()
        if self.fail:
            raise ConnectionError("registry down")


@pytest.mark.parametrize("fail", [False, True])
def test_drafter_actor_heartbeat_callback(tmp_path, caplog, fail):
    """Registered at start, refreshed every heartbeat_s, deregistered with address None on shutdown;
    a failing callback is logged and serving goes on. Built from the verifier parts, not the verifier."""
    from actors.drafter_actor import DrafterActor
    from actors.grpc_client import SyncDrafterClient

    vdir = _save_verifier(tmp_path / "v")
    hb = _Recorder(fail=fail)
    actor = DrafterActor("x", None, verifier=str(vdir), heartbeat=hb, heartbeat_s=0.05)
    try:
        info = actor.info()
        assert hb.calls[0] == ("x", info["replica_id"], info["address"])
        assert hb.beat.wait(10.0)
        assert all(c == hb.calls[0] for c in list(hb.calls))
        assert isinstance(actor.runner.drafter.embed_tokens, torch.nn.Embedding)
        with SyncDrafterClient(info["address"]) as c:  # still serving after failed beats
            tree, _ = c.draft("r", torch.tensor([5, 6, 7]), torch.randn(3, H),
                              TreeConfig(depth=2, top_k=1, total_tokens=3), start=0)
            assert tree.tokens.numel() == 3
    finally:
        actor.shutdown()
    assert hb.calls[-1] == ("x", info["replica_id"], None)
    n = len(hb.calls)
    time.sleep(0.2)
    assert len(hb.calls) == n  # no beat after deregistration
    if fail:
        assert "heartbeat" in caplog.text and "registry down" in caplog.text


def test_drafter_actor_refuses_a_heartbeat_that_is_not_callable(tmp_path):
    from actors.drafter_actor import DrafterActor

    with pytest.raises(TypeError, match="heartbeat"):  # e.g. a caller still passing a registry URL
        DrafterActor("lookup", None, verifier=str(_save_verifier(tmp_path / "v")), heartbeat="redis://x:6379")


def test_drafter_actor_without_heartbeat_evicts_idle_requests(tmp_path):
    from actors.drafter_actor import DrafterActor

    actor = DrafterActor("lookup", None, verifier=str(_save_verifier(tmp_path / "v")), heartbeat_s=0.05,
                         idle_timeout_s=0.0)
    try:
        assert actor.info()["hidden_size"] == H
        actor.runner.draft("r", torch.tensor([1, 2, 1]), None, TreeConfig(depth=2, top_k=1, total_tokens=3))
        deadline = time.monotonic() + 10
        while actor.runner.active_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert actor.runner.active_requests == 0
    finally:
        actor.shutdown()


def test_actor_options_reserve_no_cpu_locally():
    from actors.drafter_actor import drafter_actor_options
    from actors.verifier_actor import verifier_actor_options

    local = drafter_actor_options("math", gpu=False)
    assert local["num_cpus"] == 0 and "num_gpus" not in local and "resources" not in local
    assert local["max_restarts"] == -1 and local["max_concurrency"] == 4
    assert drafter_actor_options("math", gpu=False, num_cpus=0.5)["num_cpus"] == 0.5
    gpu = drafter_actor_options("math", gpu=True)
    assert gpu["num_gpus"] == 1 and gpu["resources"] == {"drafter_math": 1} and "num_cpus" not in gpu
    assert drafter_actor_options("math", gpu=True, num_cpus=2)["num_cpus"] == 2

    vlocal = verifier_actor_options(gpu=False)
    assert vlocal["num_cpus"] == 0 and "num_gpus" not in vlocal and vlocal["max_concurrency"] == 1000
    assert verifier_actor_options(gpu=False, num_cpus=1)["num_cpus"] == 1
    vgpu = verifier_actor_options(gpu=True)
    assert vgpu["num_gpus"] == 1 and vgpu["accelerator_type"] == "A100" and "num_cpus" not in vgpu
