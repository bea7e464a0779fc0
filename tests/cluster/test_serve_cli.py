"""`taps serve` start-up on a small machine: a config whose actors cannot all be placed fails at
once with one line naming the short resource, and Ctrl-C during start-up stops everything it
started within 10 s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.fleet import actor_resources, check_placement

ROOT = Path(__file__).resolve().parents[2]


def test_placement_check_names_the_short_resource():
    opts = {"num_cpus": 0.5, "max_restarts": -1}
    plan = [(f"drafter actor taps-drafter-d{i}-0", opts) for i in range(9)]
    short = check_placement(plan, free={"CPU": 2.0}, total={"CPU": 2.0})
    assert short.startswith("cannot place drafter actor taps-drafter-d4-0: it needs CPU 0.5, the cluster has 2 CPU")
    assert "4 actor(s) before it" in short
    assert check_placement(plan[:4], free={"CPU": 2.0}, total={"CPU": 2.0}) is None
    # local defaults reserve no CPU: any number fits
    assert check_placement([("a", {"num_cpus": 0})] * 50, free={"CPU": 2.0}, total={"CPU": 2.0}) is None
    gpu = {"num_gpus": 1, "resources": {"drafter_math": 1}}
    assert actor_resources(gpu) == {"CPU": 1.0, "GPU": 1.0, "drafter_math": 1.0}  # Ray: 1 CPU to schedule by default
    assert "needs GPU 1" in check_placement([("x", gpu)], free={"CPU": 8.0}, total={"CPU": 8.0})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args, tmp_path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(_free_port()), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.ray
def test_unplaceable_config_fails_fast_with_one_line(tmp_path):
    import yaml

    cfg = tmp_path / "nine.yaml"
    cfg.write_text(yaml.safe_dump({"drafters": [{"name": f"d{i}", "num_cpus": 0.5} for i in range(9)]}))
    t0 = time.monotonic()
    proc = _serve(["--config", str(cfg)], tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert time.monotonic() - t0 < 60
    lines = [ln for ln in out.splitlines() if ln.startswith("taps serve:")]
    assert len(lines) == 1 and "cannot place drafter actor" in lines[0] and "needs CPU 0.5" in lines[0], out


@pytest.mark.slow
@pytest.mark.ray
# inside ray.init, once the raylet has started its agents (they outlive a raylet that goes first),
# and a few seconds later (Serve starting)
@pytest.mark.parametrize("trigger,after_s", [("RuntimeEnvAgent", 0.0), ("raylet", 3.0)])
def test_ctrl_c_during_start_up_stops_everything_within_10_s(tmp_path, trigger, after_s):
    import psutil

    t_start = time.time() - 1
    proc = _serve(["--drafters", "lookup"], tmp_path)
    me = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    started: set = set()
    while time.monotonic() < deadline:  # until the Ray head runs (start-up under way)
        started |= {p for p in me.children(recursive=True)}
        if any(trigger in " ".join(p.cmdline()) for p in started if p.is_running()):
            break
        time.sleep(0.1)
    t_end = time.monotonic() + after_s
    while time.monotonic() < t_end:
        started |= set(me.children(recursive=True))
        time.sleep(0.1)
    started |= set(me.children(recursive=True))
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=15)
    while time.monotonic() - t0 < 10 and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started):
        time.sleep(0.2)
    def ray_process(p) -> bool:  # any Ray process born since the test began, orphans of the start included
        try:
            return (p.create_time() >= t_start and p.status() != psutil.STATUS_ZOMBIE
                    and any(k in " ".join(p.cmdline()) for k in ("ray::", "raylet", "gcs_server", "ray/dashboard")))
        except psutil.Error:
            return False

    while time.monotonic() - t0 < 10 and any(ray_process(p) for p in psutil.process_iter()):
        time.sleep(0.2)
    started |= {p for p in psutil.process_iter() if ray_process(p)}
    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    took = time.monotonic() - t0
    for p in left:
        p.kill()
    assert not left and took < 10, (took, [p.cmdline()[:2] for p in left])
