"""The served system on a real local Ray cluster: OpenAI client, losslessness against in-process
plain decoding, drafters added and removed at runtime, failures, bad input, keys."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
import torch

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from ray import serve  # noqa: E402

from taps.compose import parse_strategy  # noqa: E402
from taps.config import SamplingConfig, TreeConfig  # noqa: E402
from taps.models.drafter import new_drafter, save_drafter  # noqa: E402
from taps.models.loading import load_verifier  # noqa: E402
from tests.support import make_tiny_verifier_dir  # noqa: E402

ADMIN_KEY = "admin-secret"
API_KEY = "user-secret"
TREE = {"depth": 3, "top_k": 2, "total_tokens": 6}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from cluster.app import NAMESPACE, build_app

    root = tmp_path_factory.mktemp("cluster")
    vdir = make_tiny_verifier_dir(root / "verifier", seed=3)
    verifier = load_verifier(str(vdir), dtype=torch.float64)
    paths = {}
    for i, name in enumerate(("math", "chat", "code")):
        paths[name] = root / "drafters" / name
        save_drafter(new_drafter(name, verifier, seed=10 + i), paths[name])
    port = _free_port()
    cfg = {"verifier": str(vdir), "dtype": "float64", "tree": {**TREE, "mode": "fixed"}, "strategy": "merged",
           "drafters": [{"name": "math", "checkpoint": str(paths["math"])},
                        {"name": "chat", "checkpoint": str(paths["chat"])}],
           "api_key": API_KEY, "admin_key": ADMIN_KEY, "max_len": 512, "max_tokens_limit": 64,
           "deadline_ms": 20000, "min_replicas": 1, "max_replicas": 1}
    from cluster.serve import use_patient_serve_env

    use_patient_serve_env()
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name="taps", route_prefix="/", blocking=False)
    except Exception:
        ray.shutdown()  # leave no Ray behind for the next test module
        raise
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 300:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    yield {"base": base, "verifier": verifier, "paths": paths, "vdir": vdir}
    serve.shutdown()
    ray.shutdown()


def _client(cluster):
    return openai.OpenAI(base_url=f"{cluster['base']}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def _reference(cluster, prompt_ids, n):
    from taps.engine import TapsEngine
    from taps.verify import VerifierRunner

    v = cluster["verifier"]
    eng = TapsEngine(VerifierRunner(v.model, max_len=512), {}, TreeConfig(**TREE), v.eos_token_ids)
    return eng.generate(prompt_ids, parse_strategy("none", []), SamplingConfig(), n).token_ids


MESSAGES = [{"role": "user", "content": "What is 17*23?"}]


def test_chat_completion_every_strategy_equals_plain_decoding(cluster):
    client = _client(cluster)
    prompt_ids = cluster["verifier"].encode_chat(MESSAGES)
    ref = _reference(cluster, prompt_ids, 24)
    for strategy in ("none", "single:math", "single:chat", "confidence", "entropy", "merged"):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                           extra_body={"taps": {"strategy": strategy, "drafters": ["math", "chat"]}})
        taps = r.model_extra["taps"]
        assert taps["token_ids"] == ref, strategy
        assert taps["strategy"] == strategy
        assert r.usage.completion_tokens == len(ref)
        assert r.choices[0].message.content == cluster["verifier"].tokenizer.decode(ref, skip_special_tokens=True)


def test_streaming_and_completions(cluster):
    client = _client(cluster)
    prompt_ids = cluster["verifier"].encode_chat(MESSAGES)
    ref = _reference(cluster, prompt_ids, 20)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0,
                                            stream=True, extra_body={"taps": {"strategy": "merged"}})
    pieces, last = [], None
    for ev in stream:
        last = ev
        if ev.choices and ev.choices[0].delta.content:
            pieces.append(ev.choices[0].delta.content)
    assert last.model_extra["taps"]["token_ids"] == ref
    assert "".join(pieces) == cluster["verifier"].tokenizer.decode(ref, skip_special_tokens=True)
    comp = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=12, temperature=0)
    ids = cluster["verifier"].tokenizer.encode("The capital of France is")
    assert comp.model_extra["taps"]["token_ids"] == _reference(cluster, ids, 12)
    assert [m.id for m in client.models.list().data] == ["verifier"]


def _admin(cluster, method, path, **kw):
    return httpx.request(method, cluster["base"] + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                         timeout=600, **kw)


def test_drafter_added_at_runtime_is_used_then_removed(cluster, capsys, monkeypatch):
    """`taps drafters add|list|remove` (cluster.admin) against the running server."""
    import argparse

    from cluster import admin

    def drafters(action, **kw):
        ns = dict(name=None, checkpoint=None, replicas=1, url=cluster["base"], admin_key=None)
        return admin.main(argparse.Namespace(action=action, **{**ns, **kw}))

    r = httpx.post(cluster["base"] + "/v1/drafters", json={"name": "code", "checkpoint": str(cluster["paths"]["code"])},
                   timeout=60)
    assert r.status_code == 401  # admin key required
    monkeypatch.delenv("TAPS_ADMIN_KEY", raising=False)
    assert drafters("list") == 1 and "401" in capsys.readouterr().err
    monkeypatch.setenv("TAPS_ADMIN_KEY", ADMIN_KEY)
    assert drafters("add", name="code", checkpoint=str(cluster["paths"]["code"])) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "code"
    assert drafters("list") == 0
    assert "code" in [d["name"] for d in json.loads(capsys.readouterr().out)["data"]]
    client = _client(cluster)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0,
                                       extra_body={"taps": {"strategy": "single:code"}})
    taps = r.model_extra["taps"]
    assert taps["selected"].get("code", 0) == taps["steps"] > 0
    assert taps["token_ids"] == _reference(cluster, cluster["verifier"].encode_chat(MESSAGES), 16)
    assert drafters("remove", name="code") == 0
    assert drafters("remove", name="code") == 1 and "404" in capsys.readouterr().err
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                       extra_body={"taps": {"strategy": "single:code"}})


def _metric(text: str, name: str, **labels) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()))


def test_killed_drafter_does_not_break_requests(cluster):
    """Killed mid-stream: the request stays lossless, the miss shows in /metrics, the actor comes back."""
    from cluster.app import NAMESPACE

    base, auth = cluster["base"], {"Authorization": f"Bearer {API_KEY}"}
    actor = ray.get_actor("taps-drafter-chat-0", namespace=NAMESPACE)
    errors_before = _metric(httpx.get(base + "/metrics", timeout=60).text, "taps_drafter_errors_total", drafter="chat")
    body = {"messages": MESSAGES, "max_tokens": 48, "temperature": 0, "stream": True,
            "taps": {"strategy": "merged", "drafters": ["math", "chat"]}}
    last, killed = None, False
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, headers=auth, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if not killed:  # after the first chunk: Ray restarts it; meanwhile steps go on without it
                ray.kill(actor, no_restart=False)
                killed = True
            last = json.loads(line[len("data: "):])
    assert last["taps"]["token_ids"] == _reference(cluster, cluster["verifier"].encode_chat(MESSAGES), 48)
    errors_after = _metric(httpx.get(base + "/metrics", timeout=60).text, "taps_drafter_errors_total", drafter="chat")
    assert errors_after > errors_before  # the failure shows in /metrics
    # it comes back on a new port and replaces its own registry entry, and serves the next request
    address = ray.get(actor.info.remote(), timeout=180)["address"]
    chat = [d for d in _admin(cluster, "GET", "/v1/drafters").json()["data"] if d["name"] == "chat"][0]
    assert chat["replicas"] == [address] and chat["status"] == "ready"
    r = _client(cluster).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0,
                                                 extra_body={"taps": {"strategy": "single:chat"}})
    taps = r.model_extra["taps"]
    assert taps["selected"].get("chat", 0) == taps["steps"] > 0
    assert taps["token_ids"] == _reference(cluster, cluster["verifier"].encode_chat(MESSAGES), 16)


@pytest.mark.parametrize("body,status", [
    ({"messages": []}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "taps": {"strategy": "bogus"}}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "taps": {"strategy": "single:nobody"}}, 400),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ({"messages": [{"role": "user", "content": "x " * 3000}], "max_tokens": 8}, 400),
    ({"messages": "hello"}, 400),
])
def test_bad_input_gets_openai_error_shape(cluster, body, status):
    r = httpx.post(cluster["base"] + "/v1/chat/completions", json=body, timeout=120,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_malformed_json_and_keys(cluster):
    h = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    r = httpx.post(cluster["base"] + "/v1/chat/completions", content=b"{not json", headers=h, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] in ("invalid_json", "invalid_request")
    r = httpx.post(cluster["base"] + "/v1/chat/completions", content=b'{"messages": "\xff\xfe"}', headers=h, timeout=60)
    assert r.status_code == 400
    r = httpx.post(cluster["base"] + "/v1/chat/completions", json={"messages": MESSAGES}, timeout=60)
    assert r.status_code == 401
    assert httpx.get(cluster["base"] + "/health", timeout=60).json()["status"] == "ok"
    metrics = httpx.get(cluster["base"] + "/metrics", timeout=60).text
    assert "taps_requests_total" in metrics and "taps_acceptance_length" in metrics


def test_client_disconnect_mid_stream_leaves_no_request_state(cluster):
    """A client hangs up while its request shares verifier ticks with three others: its state goes,
    the others finish, token-identical to plain decoding."""
    import concurrent.futures as cf

    from cluster.app import NAMESPACE

    client = _client(cluster)
    prompts = [[{"role": "user", "content": f"Count to {i}."}] for i in range(3)]
    refs = [_reference(cluster, cluster["verifier"].encode_chat(m), 40) for m in prompts]

    def other(i):
        r = client.chat.completions.create(model="tiny", messages=prompts[i], max_tokens=40, temperature=0,
                                           extra_body={"taps": {"strategy": ["none", "merged", "confidence"][i]}})
        return r.model_extra["taps"]["token_ids"]

    body = {"messages": MESSAGES, "max_tokens": 60, "temperature": 0, "stream": True,
            "taps": {"strategy": "merged", "drafters": ["math", "chat"]}}
    with cf.ThreadPoolExecutor(3) as pool:
        others = [pool.submit(other, i) for i in range(3)]
        with httpx.stream("POST", cluster["base"] + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 2:
                    break  # hang up mid-stream
        assert [f.result() for f in others] == refs
    verifier = ray.get_actor("taps-verifier", namespace=NAMESPACE)
    drafters = [ray.get_actor(f"taps-drafter-{n}-0", namespace=NAMESPACE) for n in ("math", "chat")]
    t0 = time.time()
    while time.time() - t0 < 60:
        active = [ray.get(verifier.info.remote())["active_requests"]]
        active += [ray.get(d.info.remote())["active_requests"] for d in drafters]
        if not any(active):
            break
        time.sleep(0.5)
    assert not any(active), active


def test_concurrent_streams_are_all_lossless(cluster):
    import concurrent.futures as cf

    client = _client(cluster)
    prompts = [[{"role": "user", "content": f"Count to {i}."}] for i in range(8)]
    refs = [_reference(cluster, cluster["verifier"].encode_chat(m), 12) for m in prompts]

    def one(i):
        r = client.chat.completions.create(model="tiny", messages=prompts[i], max_tokens=12, temperature=0,
                                           extra_body={"taps": {"strategy": ["merged", "confidence"][i % 2]}})
        return r.model_extra["taps"]["token_ids"]

    with cf.ThreadPoolExecutor(8) as pool:  # 8 requests at once
        outs = list(pool.map(one, range(8)))
    assert outs == refs


def test_backpressure_answers_429_beyond_the_queue(cluster):
    """A second router app with room for one request and no queue: concurrent callers get 429, never 500."""
    import concurrent.futures as cf

    from cluster.app import build_app

    cfg = {"verifier": str(cluster["vdir"]), "dtype": "float64", "tree": TREE, "drafters": [], "strategy": "none",
           "max_len": 512, "max_concurrent": 1, "max_queue": 0, "min_replicas": 1, "max_replicas": 1}
    serve.run(build_app(cfg), name="taps-bp", route_prefix="/bp", blocking=False)
    body = {"messages": MESSAGES, "max_tokens": 48, "temperature": 0}

    def one(_):
        return httpx.post(cluster["base"] + "/bp/v1/chat/completions", json=body, timeout=300)

    t0 = time.time()
    while httpx.get(cluster["base"] + "/bp/health", timeout=30).status_code != 200 and time.time() - t0 < 120:
        time.sleep(1)
    with cf.ThreadPoolExecutor(6) as pool:
        codes = [r.status_code for r in pool.map(one, range(6))]
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    serve.delete("taps-bp")


def test_fuzzed_http_bodies_never_500(cluster):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9),
                       st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))  # JSON has no inf
    field = st.one_of(scalar, st.lists(scalar, max_size=3), st.dictionaries(st.text(max_size=8), scalar, max_size=3))
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x", 3]), "content": field})
    body = st.fixed_dictionaries({}, optional={
        "messages": st.one_of(st.lists(message, max_size=3), field),
        "max_tokens": st.one_of(st.integers(-5, 10**7), scalar), "temperature": st.one_of(st.floats(-3, 5), scalar),
        "top_p": field, "stream": st.booleans(), "n": st.integers(-1, 3),
        "taps": st.one_of(field, st.fixed_dictionaries({}, optional={"strategy": st.sampled_from(
            ["none", "merged", "single:math", "single:", "bogus", "entropy"]), "drafters": st.lists(st.text(max_size=6))}))})

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body)
    def check(b):
        if isinstance(b.get("max_tokens"), int) and b["max_tokens"] > 0:
            b["max_tokens"] = min(b["max_tokens"], 4)  # keep accepted requests short
        r = httpx.post(cluster["base"] + "/v1/chat/completions", json=b, timeout=120,
                       headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code in (200, 400, 413, 429), (b, r.status_code, r.text[:300])
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()


def test_killed_verifier_fails_cleanly_then_recovers(cluster):
    from cluster.app import NAMESPACE

    verifier = ray.get_actor("taps-verifier", namespace=NAMESPACE)
    ray.kill(verifier, no_restart=False)
    statuses = []
    t0 = time.time()
    while time.time() - t0 < 180:
        r = httpx.post(cluster["base"] + "/v1/chat/completions", timeout=120,
                       headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"messages": MESSAGES, "max_tokens": 8, "temperature": 0})
        statuses.append(r.status_code)
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text  # retryable, in the OpenAI error shape
        assert r.json()["error"]["code"] == "verifier_unavailable"
        assert r.headers.get("retry-after")
        time.sleep(1)
    assert statuses[-1] == 200, statuses
    assert r.json()["taps"]["token_ids"] == _reference(cluster, cluster["verifier"].encode_chat(MESSAGES), 8)
