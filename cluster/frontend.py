"""The OpenAI front end (the Serve ingress): schemas, auth, limits, tokenization and the response
shapes, streamed (SSE) or not. Decoding happens in the DecodeService, drafter lifecycle in the
DrafterFleet; both arrive as Serve handles bound by `cluster.app.build_app`.

Per request: `n` choices for each prompt (a list of prompts for completions), each one decode
stream. Choice i of a seeded request uses seed + i, so choice 0 equals the same request with n=1.
Text arrives detokenized: each `Emitted` event carries its text delta, cut before a stop sequence
by the decode loop (which ends decoding at the step that completes one); `finish_reason` is "stop" for an end-of-sequence token or a stop sequence,
"length" for max_tokens, sent exactly once per choice, in its last chunk.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from cluster.config import AppConfig
from cluster.decode import DecodeJob, Finished, Started
from cluster.errors import BadRequest, ModelNotFound, ServingError
from cluster.metrics import Metrics
from cluster.openai_api import ChatRequest, CompletionRequest, DrafterAdd, error
from taps.config import ConfigError, SamplingConfig
from taps.loop import Emitted

log = logging.getLogger(__name__)


def _is_loopback(request: Request) -> bool:
    try:
        return ipaddress.ip_address(request.client.host).is_loopback
    except (ValueError, AttributeError):
        return False


def as_serving_error(e: BaseException) -> ServingError:
    """The typed error behind `e` (Ray re-raises a replica's error around it as `cause`); anything
    else becomes a 500 internal_error."""
    cause = e if isinstance(e, ServingError) else getattr(e, "cause", None)
    if isinstance(cause, ServingError):
        return cause
    log.exception("request failed", exc_info=e)
    # the body names the error's type only: str() of a Ray error carries the remote traceback
    inner = cause if isinstance(cause, BaseException) else e
    return ServingError(f"generation failed: internal error ({type(inner).__name__}); the server log has the details")


def error_response(e: BaseException) -> JSONResponse:
    """Any error as the OpenAI error body with its status."""
    err = as_serving_error(e)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _sse(obj) -> str:
    import json

    return f"data: {json.dumps(obj)}\n\n"


@dataclass
class Choice:
    """One decode stream and what its response has seen so far."""

    index: int
    stream: object  # DeploymentResponseGenerator
    prefix: str = ""  # echo: the prompt text, sent first
    text: str = ""
    logprobs: list = field(default_factory=list)  # TokenLogprob of every token received
    finish: str | None = None
    finished: Finished | None = None
    tokens: int = 0  # completion tokens received so far

    async def events(self):
        """(text delta, [TokenLogprob]) per step, until finish is set."""
        if self.prefix:
            self.text += self.prefix
            yield self.prefix, []
        async for item in self.stream:
            if isinstance(item, Finished):
                self.finished = item
                self.finish = "stop" if (item.eos or item.stopped) else "length"
                self.text += item.text
                yield item.text, []
                return
            if isinstance(item, Emitted):
                self.tokens += len(item)
                lps = list(item.logprobs or [])
                self.logprobs.extend(lps)
                self.text += item.text
                yield item.text, lps

    def cancel(self) -> None:
        try:
            self.stream.cancel()
        except Exception:  # noqa: BLE001 - already finished
            pass


class OpenAIFrontEnd:
    def __init__(self, config: dict, decoder, fleet):
        from transformers import AutoTokenizer

        from taps.models.loading import resolve_verifier

        self.cfg = AppConfig.model_validate(config).resolved()
        self.decoder, self.fleet = decoder, fleet
        self.verifier_name, vdir = resolve_verifier(self.cfg.verifier)
        self.model_names = list(self.cfg.served_model_names or [self.verifier_name])
        self.tokenizer = AutoTokenizer.from_pretrained(str(vdir))
        self.metrics = Metrics()

    # ------------------------------------------------------------------ edges
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
        """The body, read with a cap (a declared Content-Length over it is refused before reading; a
        body that streams past it is cut off), validated into `model`."""
        cap = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        size = int(declared) if declared.isdigit() else 0
        chunks = []
        if size <= cap:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    break
                chunks.append(chunk)
        if size > cap:
            return None, error(413, f"request body over {cap} bytes", code="body_too_large")
        raw = b"".join(chunks)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, error(400, "request body is not valid UTF-8", code="invalid_utf8")
        try:
            return model.model_validate_json(text), None
        except ValueError as e:
            errs = getattr(e, "errors", lambda: [])()
            if errs:
                return None, validation_error(errs)
            return None, error(400, f"invalid JSON body: {e}", code="invalid_json")

    # ------------------------------------------------------------------ requests
    def _prompts(self, kind: str, req) -> list[tuple[list[int], str]]:
        """(prompt ids, echo text) per prompt."""
        if kind == "chat":
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            if not any(m["content"].strip() for m in msgs):
                raise BadRequest("messages are empty", param="messages")
            out = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
            ids = list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "input_ids") else out)
            return [(ids, "")]
        prompts = req.prompts()
        if not prompts:
            raise BadRequest("prompt is empty", param="prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if not p:
                    raise BadRequest("prompt is empty", param="prompt")
                ids = self.tokenizer.encode(p)
                out.append((ids, p if req.echo else ""))
            else:
                if not p:
                    raise BadRequest("prompt is empty", param="prompt")
                if max(p) >= len(self.tokenizer):
                    raise BadRequest(f"prompt token id {max(p)} is outside the vocabulary of {len(self.tokenizer)}",
                                     param="prompt")
                out.append((list(p), self.tokenizer.decode(p, skip_special_tokens=True) if req.echo else ""))
        return out

    def _jobs(self, kind: str, req) -> list[tuple[DecodeJob, str]]:
        if req.model is not None and req.model not in self.model_names:
            raise ModelNotFound(f"the model {req.model!r} does not exist on this server; it serves "
                                f"{', '.join(self.model_names)}", param="model")
        max_new = req.max_completion_tokens or req.max_tokens or 256
        opts = req.taps
        jobs = []
        for ids, echo in self._prompts(kind, req):
            for j in range(req.n):
                try:
                    sampling = SamplingConfig(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                              seed=None if req.seed is None else req.seed + j,
                                              logprobs=req.logprob_count, min_tokens=req.min_tokens)
                except ConfigError as e:
                    raise BadRequest(str(e)) from e
                jobs.append((DecodeJob(ids, sampling, max_new, opts.strategy if opts else None,
                                       opts.drafters if opts else None, uuid.uuid4().hex,
                                       tuple(req.stops()), req.output_options()), echo))
        return jobs

    async def _infer(self, request: Request, kind: str):
        denied = self._auth(request)
        if denied:
            return denied
        req, bad = await self._body(request, ChatRequest if kind == "chat" else CompletionRequest)
        if bad:
            return bad
        try:
            jobs = self._jobs(kind, req)
        except ServingError as e:
            return error_response(e)
        choices = [Choice(i, self.decoder.options(stream=True).generate.remote(job), prefix=echo)
                   for i, (job, echo) in enumerate(jobs)]
        try:  # the first item: admitted (or a typed error, before anything is sent)
            starts = await asyncio.gather(*(c.stream.__anext__() for c in choices))
        except BaseException as e:  # noqa: BLE001 - every stream goes, the error is answered
            for c in choices:
                c.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
            err = as_serving_error(e)
            if err.status == 429:
                self.metrics.rejected.inc()
            return error_response(err)
        assert all(isinstance(s, Started) for s in starts)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        model = req.model or self.model_names[0]
        prompt_tokens = sum(len(job.prompt_ids) for job, _ in jobs[::req.n])
        view = ResponseView(kind, rid, model, self.tokenizer, req.logprob_count)
        if req.stream:
            view.continuous_usage = (prompt_tokens, choices) if req.continuous_usage else None
            return StreamingResponse(self._stream(view, choices, prompt_tokens, req.include_usage),
                                     media_type="text/event-stream")
        try:
            await asyncio.gather(*(self._drain(c) for c in choices))
        except BaseException as e:  # noqa: BLE001
            for c in choices:
                c.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
            return error_response(e)
        return JSONResponse(view.body(choices, prompt_tokens))

    async def _drain(self, c: Choice) -> None:
        async for _ in c.events():
            pass
        self._observe(c)

    def _observe(self, c: Choice) -> None:
        if c.finished is not None:
            self.metrics.observe(c.finished.stats)
            for name, n in c.finished.drafter_errors.items():
                self.metrics.drafter_errors.labels(name).inc(n)

    async def _stream(self, view: ResponseView, choices: list[Choice], prompt_tokens: int, include_usage: bool):
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: Choice):
            try:
                first = True
                async for delta, lps in c.events():
                    if delta or lps or first:
                        queue.put_nowait(view.chunk(c, delta, lps, None, first))
                        first = False
                self._observe(c)
                queue.put_nowait(view.chunk(c, "", [], c.finish, first, final=True))
            except Exception as e:  # noqa: BLE001 - reported in the stream
                queue.put_nowait(as_serving_error(e).body())
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            open_ = len(tasks)
            while open_:
                item = await queue.get()
                if item is None:
                    open_ -= 1
                    continue
                yield _sse(item)
                if "error" in item:
                    return
            if include_usage:
                yield _sse(view.usage_chunk(choices, prompt_tokens))
            yield "data: [DONE]\n\n"
        finally:  # a client that hangs up cancels every stream: the decode service releases at once
            for t in tasks:
                t.cancel()
            for c in choices:
                c.cancel()

    # ------------------------------------------------------------------ routes
    async def chat_completions(self, request: Request):
        return await self._infer(request, "chat")

    async def completions(self, request: Request):
        return await self._infer(request, "completion")

    async def models(self, request: Request):
        denied = self._auth(request)
        if denied:
            return denied
        drafters = sorted(await self.fleet.ready_count.remote())
        engine = await self.fleet.engine_info.remote()  # {"engine": "int8-avx2", "numerics": "fast"}
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "taps",
                                            "drafters": drafters, **engine} for name in self.model_names]}

    async def health(self):
        verifier_ok = await self.decoder.health.remote()
        drafters = await self.fleet.ready_count.remote()
        body = {"status": "ok" if verifier_ok else "degraded", "verifier": verifier_ok, "drafters": drafters,
                "registry": await self.fleet.registry_ok.remote()}
        return JSONResponse(body, status_code=200 if verifier_ok else 503)

    async def metrics_text(self):
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def list_drafters(self, request: Request):
        denied = self._auth(request, admin=True)
        if denied:
            return denied
        return {"object": "list", "data": await self.fleet.list.remote()}

    async def add_drafter(self, request: Request):
        denied = self._auth(request, admin=True)
        if denied:
            return denied
        body, bad = await self._body(request, DrafterAdd)
        if bad:
            return bad
        try:
            info = await self.fleet.add.remote(body.model_dump())
        except Exception as e:  # noqa: BLE001 - typed errors answer with their status
            return error_response(e)
        return JSONResponse(info, status_code=201)

    async def remove_drafter(self, name: str, request: Request):
        denied = self._auth(request, admin=True)
        if denied:
            return denied
        try:
            return await self.fleet.remove.remote(name)
        except Exception as e:  # noqa: BLE001
            return error_response(e)


def validation_error(errs: list[dict]) -> JSONResponse:
    first = errs[0] if errs else {}
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    if first.get("type") == "extra_forbidden":
        return error(400, f"parameter {loc!r} is not supported by this server", param=loc or None,
                     code="unsupported_parameter")
    msg = first.get("msg", "invalid request")
    return error(400, f"{loc or 'body'}: {msg}", param=loc or None, code="invalid_request")


def taps_stats(finished: Finished) -> dict:
    """The `taps` extension of a response: the stats object of CONTRACTS.md and the emitted token ids."""
    return {**finished.stats.to_dict(), "token_ids": finished.token_ids}


@dataclass
class ResponseView:
    """The OpenAI response shapes of one request (chat or completion, streamed or not)."""

    kind: str
    rid: str
    model: str
    tokenizer: object
    logprob_count: int | None
    created: int = field(default_factory=lambda: int(time.time()))
    continuous_usage: tuple | None = None  # (prompt tokens, choices): `usage` in every streamed chunk

    @property
    def chat(self) -> bool:
        return self.kind == "chat"

    def _token(self, t: int) -> str:
        return self.tokenizer.decode([t])

    def logprobs(self, lps: list, offset: int = 0) -> dict | None:
        if self.logprob_count is None:
            return None
        if self.chat:
            def entry(t, lp):
                s = self._token(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

            return {"content": [{**entry(x.token, x.logprob), "top_logprobs": [entry(t, lp) for t, lp in x.top]}
                                for x in lps], "refusal": None}
        tokens = [self._token(x.token) for x in lps]
        offsets, at = [], offset
        for s in tokens:
            offsets.append(at)
            at += len(s)
        return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
                "top_logprobs": [{self._token(t): lp for t, lp in x.top} for x in lps] if self.logprob_count else None,
                "text_offset": offsets}

    def _head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, c: Choice, text: str, lps: list, finish: str | None, first: bool, final: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": c.index, "delta": delta, "logprobs": self.logprobs(lps) if lps else None,
                      "finish_reason": finish}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": c.index, "text": text, "logprobs": self.logprobs(lps) if lps else None,
                      "finish_reason": finish}
            body = {**self._head("text_completion"), "choices": [choice]}
        if final and c.finished is not None:
            body["taps"] = taps_stats(c.finished)
        if self.continuous_usage is not None:  # vLLM's continuous_usage_stats: usage so far, every chunk
            prompt_tokens, choices = self.continuous_usage
            done = sum(x.tokens for x in choices)
            body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                             "total_tokens": prompt_tokens + done}
        return body

    def usage(self, choices: list[Choice], prompt_tokens: int) -> dict:
        done = sum(len(c.finished.token_ids) for c in choices if c.finished is not None)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

    def usage_chunk(self, choices: list[Choice], prompt_tokens: int) -> dict:
        """The last chunk with stream_options.include_usage: usage, and (CONTRACTS.md: the last chunk
        carries the stats) the first choice's `taps` stats, as in a non-streamed body."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = {**self._head(obj), "choices": [], "usage": self.usage(choices, prompt_tokens)}
        if choices[0].finished is not None:
            body["taps"] = taps_stats(choices[0].finished)
        return body

    def body(self, choices: list[Choice], prompt_tokens: int) -> dict:
        out = []
        for c in choices:
            lp = self.logprobs(c.logprobs, offset=len(c.prefix))
            if self.chat:
                out.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": lp, "finish_reason": c.finish})
            else:
                out.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish})
            if len(choices) > 1 and c.finished is not None:
                out[-1]["taps"] = taps_stats(c.finished)
        first = choices[0].finished
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": out,
                "usage": self.usage(choices, prompt_tokens),
                "taps": taps_stats(first)}


def make_fastapi_app() -> FastAPI:
    """The HTTP surface, built inside each front-end replica; handlers call the replica's OpenAIFrontEnd.

    (Routes are closures over the servable rather than decorated methods: Ray's class-based view
    rewriting does not apply with the FastAPI release pinned here.)
    """
    from ray import serve

    app = FastAPI(title="TAPS-Serve", version="0.1.0")

    def front() -> OpenAIFrontEnd:
        return serve.get_replica_context().servable_object

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return validation_error(exc.errors())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await front().chat_completions(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await front().completions(request)

    @app.get("/v1/models")
    async def models(request: Request):
        return await front().models(request)

    @app.get("/health")
    async def health():
        return await front().health()

    @app.get("/metrics")
    async def metrics():
        return await front().metrics_text()

    @app.get("/v1/drafters")
    async def list_drafters(request: Request):
        return await front().list_drafters(request)

    @app.post("/v1/drafters")
    async def add_drafter(request: Request):
        return await front().add_drafter(request)

    @app.delete("/v1/drafters/{name}")
    async def remove_drafter(name: str, request: Request):
        return await front().remove_drafter(name, request)

    return app
