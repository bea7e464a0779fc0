"""Training in the serving cluster, end to end: while the router serves, a drafter is trained with
DeepSpeed on Ray Train through the cluster's job server (`ray job submit`), added at runtime with the
admin API, and used by the next request, whose output still equals plain decoding."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

ray = pytest.importorskip("ray")

from ray import serve  # noqa: E402

from tests.support import start_local_ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_in_the_serving_cluster_then_add_and_use(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from cluster.app import NAMESPACE, build_app
    from taps.compose import parse_strategy
    from taps.config import SamplingConfig, TreeConfig
    from taps.engine import TapsEngine
    from taps.models.loading import load_verifier
    from taps.verify import VerifierRunner
    from training.prepare import make_tiny_workspace

    make_tiny_workspace(tmp_path)
    vdir = tmp_path / "runs/tiny/verifier"
    port, dash = _free_port(), _free_port()
    from cluster.serve import use_patient_serve_env

    use_patient_serve_env()
    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(num_cpus=4, namespace=NAMESPACE, include_dashboard=True, dashboard_host="127.0.0.1",
                    dashboard_port=dash, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"verifier": str(vdir), "dtype": "float64", "drafters": [], "max_len": 512,
                             "tree": {"depth": 3, "top_k": 2, "total_tokens": 6, "mode": "fixed"}, "deadline_ms": 20000}),
                  name="taps", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        # train through the job server of the very cluster that serves
        client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
        job = client.submit_job(
            entrypoint=f"{sys.executable} {ROOT}/training/train_drafter.py --config "
                       f"{ROOT}/training/configs/tiny.yaml --root {tmp_path}",
            runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}})
        t0 = time.time()
        while time.time() - t0 < 600:
            status = client.get_job_status(job)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(2)
        assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
        drafter_dir = tmp_path / "runs/tiny/drafter"
        assert (drafter_dir / "drafter.json").exists()
        # add it to the running server and use it on the next request
        r = httpx.post(f"{base}/v1/drafters", json={"name": "fresh", "checkpoint": str(drafter_dir)}, timeout=600)
        assert r.status_code == 201, r.text
        body = {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 16, "temperature": 0,
                "taps": {"strategy": "single:fresh"}}
        out = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300).json()
        taps = out["taps"]
        assert taps["selected"] == {"fresh": taps["steps"]}
        verifier = load_verifier(str(vdir), dtype=torch.float64)
        prompt_ids = verifier.encode_chat(body["messages"])
        eng = TapsEngine(VerifierRunner(verifier.model, max_len=512), {}, TreeConfig(3, 2, 6), verifier.eos_token_ids)
        assert taps["token_ids"] == eng.generate(prompt_ids, parse_strategy("none", []), SamplingConfig(), 16).token_ids
    finally:
        serve.shutdown()
        ray.shutdown()
