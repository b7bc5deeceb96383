"""The FastAPI application: routes, the OpenAI-style error handlers, and the request guard.

    POST /v1/chat/completions   chat completion, or server-sent events with "stream": true
    GET  /v1/models             the one served model
    GET  /health                200 {"status": "ok", queue counters} while serving, 503 otherwise

With an API key, /v1/* needs ``Authorization: Bearer KEY`` (401 otherwise; /health stays open for
load balancers). Every error body is ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from vita_ext.generation import GenerationConfig

from .engine import Engine, Job, Request
from .media import MediaPolicy, build_prompt
from .protocol import APIError, ChatCompletionRequest, bad_request, chunk, completion, completion_id, usage

log = logging.getLogger("vita_ext.serve")
POLL_S = 0.25  # how often a waiting handler checks that its client is still there
UNION_LABELS = {"str", "int", "float", "bool", "dict", "list", "none"}


@dataclass
class AppConfig:
    model_name: str
    max_model_len: int
    max_frames: int
    max_tiles: int
    api_key: str | None = None
    max_body_bytes: int = 64 * 2**20
    media_root: str | None = None


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


class Guard:
    """ASGI middleware run before any route: the API key (401) before the body is read, then the body
    size limit (413), for declared (Content-Length) and chunked bodies alike."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return await error_response(APIError(401, "missing or wrong API key (send 'Authorization: Bearer "
                                                          "KEY')", code="invalid_api_key"))(scope, receive, send)
        too_large = APIError(413, f"the request body is larger than the server's limit of {self.max_body} bytes "
                                  f"(--max-body-mb)", code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await error_response(too_large)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await error_response(too_large)(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():  # the buffered body once, then the real channel (disconnect notices)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


class Waiter:
    """Reads a job's events in the handler, cancelling the job when the client goes away."""

    def __init__(self, job: Job, http: HTTPRequest):
        self.job, self.http, self._get = job, http, None
        self._checked = time.monotonic()

    async def next(self):
        """The next event, or None once the client has disconnected (the job is then cancelled). The client
        is checked every POLL_S seconds, whether or not events are flowing."""
        try:
            while True:
                if time.monotonic() - self._checked >= POLL_S:
                    self._checked = time.monotonic()
                    if await self.http.is_disconnected():
                        self.close()
                        return None
                if self._get is None:
                    self._get = asyncio.ensure_future(self.job.events.get())
                done, _ = await asyncio.wait({self._get}, timeout=POLL_S)
                if done:
                    event, self._get = self._get.result(), None
                    return event
        except asyncio.CancelledError:
            self.close()
            raise

    def close(self) -> None:
        self.job.cancel()
        if self._get is not None:
            self._get.cancel()


def _request(body: ChatCompletionRequest, cfg: AppConfig, policy: MediaPolicy, gen_cfg: GenerationConfig) -> Request:
    """Validate a chat request and turn it into what every rank runs (APIError 400 on bad input)."""
    body.refuse_unsupported()
    for name, limit, flag in (("max_frames", cfg.max_frames, "--max-frames"), ("max_tiles", cfg.max_tiles, "--max-tiles")):
        value = getattr(body, name)
        if value is not None and value > limit:
            what = "frames" if name == "max_frames" else "tiles"
            raise bad_request(f"too many {what}: '{name}' is {value}, the server allows at most {limit} ({flag})",
                              name, f"too_many_{what}")
    overrides = {}
    if body.temperature is not None:
        overrides.update(temperature=body.temperature, do_sample=body.temperature > 0)
    if body.top_p is not None:
        overrides["top_p"] = body.top_p
    if body.top_k is not None:
        overrides["top_k"] = max(0, body.top_k)  # -1 (vLLM) and 0 both mean off
    if body.repetition_penalty is not None:
        overrides["repetition_penalty"] = body.repetition_penalty
    try:
        gen_cfg.updated(**overrides)
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    return Request(completion_id(), build_prompt(body, policy), body.max_frames or cfg.max_frames,
                   body.max_tiles or cfg.max_tiles, body.max_completion_tokens or body.max_tokens, body.seed, overrides)


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(job: Job, waiter: Waiter, body: ChatCompletionRequest, model: str):
    cid, created = job.request.id, int(time.time())
    with_usage = bool(body.stream_options and body.stream_options.include_usage)
    try:
        yield _sse(chunk(cid, model, created, {"role": "assistant", "content": ""}, with_usage_field=with_usage))
        while True:
            event = await waiter.next()
            if event is None:
                return
            kind, value = event
            if kind == "text":
                yield _sse(chunk(cid, model, created, {"content": value}, with_usage_field=with_usage))
            elif kind == "error":  # after the 200 header: an error event, as OpenAI-compatible servers send
                yield _sse(value.body())
                yield _sse("[DONE]")
                return
            elif kind == "done":
                yield _sse(chunk(cid, model, created, {}, value.finish_reason, with_usage_field=with_usage,
                                 timings=value.timings))
                if with_usage:
                    yield _sse(chunk(cid, model, created, None, usage=usage(value.prompt_tokens,
                                                                              value.completion_tokens)))
                yield _sse("[DONE]")
                return
    finally:
        waiter.close()


def build_app(engine: Engine, cfg: AppConfig, generation_config: GenerationConfig) -> FastAPI:
    """The application serving ``engine``'s model under the name ``cfg.model_name``."""
    app = FastAPI(title="vita-ext", docs_url=None, redoc_url=None, openapi_url=None)
    policy = MediaPolicy(cfg.media_root)

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        # The deepest error is the telling one (a union reports one error per member); its location without
        # "body" and pydantic's union-member labels ("str", "list[...]", "tagged-union[...]").
        first = max(exc.errors(), key=lambda e: len(e.get("loc", ())), default={})
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and "[" not in str(x) and x not in UNION_LABELS]
        param = ".".join(loc) or None
        return error_response(bad_request(f"{param or 'body'}: {first.get('msg', 'invalid request')}", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _bug(_, exc: Exception):
        log.error("internal error", exc_info=exc)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.get("/health")
    async def health():
        status = {"status": "ok" if engine.healthy else "unavailable", "model": cfg.model_name, **engine.status()}
        return JSONResponse(status, status_code=200 if engine.healthy else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "vita-ext", "max_model_len": cfg.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        if body.model is not None and body.model != cfg.model_name:
            raise APIError(404, f"model {body.model!r} is not served here (this server serves "
                                f"{cfg.model_name!r})", "model", "model_not_found")
        job = Job(_request(body, cfg, policy, generation_config), body.stop_strings(), asyncio.get_running_loop(),
                  stream=body.stream)
        engine.submit(job)
        waiter = Waiter(job, http)
        event = await waiter.next()  # wait for the inputs: their errors are still a proper 4xx response
        if event is None:
            return JSONResponse({}, status_code=499)  # nobody is listening
        if event[0] == "error":
            return error_response(event[1])
        if body.stream:
            return StreamingResponse(_stream(job, waiter, body, cfg.model_name), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": job.request.id})
        while (event := await waiter.next()) is not None:
            kind, value = event
            if kind == "error":
                return error_response(value)
            elif kind == "done":
                return JSONResponse(completion(job.request.id, cfg.model_name, value.text, value.finish_reason,
                                               value.prompt_tokens, value.completion_tokens, value.timings),
                                    headers={"X-Request-Id": job.request.id})
        return JSONResponse({}, status_code=499)

    app.add_middleware(Guard, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes)
    return app
