"""The FastAPI app: OpenAI ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
plus ``/health``, ``/metrics`` and the playground page at ``/`` (``ui/``, unless turned off).

Every request is validated completely (schema, prompt, SamplingParams, ``engine.validate``
for the context limit) before any engine work or any response byte, so bad input always
gets a 400 (422 for a body that is not JSON or does not match the schema's types, 413 for a
body over ``max_body_bytes``) with an OpenAI error body naming the field, and nothing else
changes. Counts are checked before any prompt is tokenized, and tokenizing (and the chat
template) runs in a worker thread, so a huge prompt never stalls other requests. An
exception that escapes a route is a counted 500 JSON answer that keeps the connection
(``guard.Guard``). Streams send only committed text (server-sent
events, ``data: {...}`` then ``data: [DONE]``). A client that disconnects has its engine
requests aborted at once, streaming or not. Responses carry OpenAI ``usage`` and a
``trimode`` object (mode used, nfe, tokens_per_forward, acceptance_length).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ...decoding.thinking import ThinkTags
from ...defaults import MAX_TOKENS, UNMASK
from ...params import MODE_DEFAULT, SamplingParams
from ...multimodal.image import ImageLimits
from ...multimodal.prompt import chat_prompt
from .generation import Job
from .guard import Guard
from .metrics import Metrics
from .protocol import (ChatCompletionRequest, CompletionRequest, RequestError, _Sampling,
                       error_body)
from .responses import Run, abort_on_disconnect

log = logging.getLogger("trimode.server")
SCHEMA_ERRORS = {"missing", "json_invalid", "model_attributes_type", "int_from_float",
                 "json_type", "value_error_json", "union_tag_invalid"}
UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}  # pydantic's union-member labels
MAX_CHOICES = 256  # engine requests one HTTP request may start (each holds KV)


@dataclass(frozen=True)
class ServerConfig:
    """The server's defaults for fields a request leaves out (its command-line flags)."""

    model_name: str
    mode: str = "auto"
    max_tokens: int = MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    block_length: int | None = None
    threshold: float | None = None
    max_model_len: int | None = None
    max_body_bytes: int = 4 * 2**20
    ui: bool = True  # GET / serves the playground (ui/); --no-ui turns it off
    max_thinking_tokens: int | None = None
    reasoning_parser: str | None = None  # "think": chat replies get reasoning_content


def build_app(engine, tokenizer, vocab_size: int, config: ServerConfig, vision=None,
              image_limits: ImageLimits = ImageLimits(local_files=False)) -> FastAPI:
    """engine: an ``AsyncEngine`` (or anything with its validate / generate / abort / stats).
    tokenizer: trimode's Tokenizer (encode, decode, apply_chat_template, check_ids).
    vision: the checkpoint's ``VisionSpec`` (NLD-VLM: ``image_url`` parts with ``data:`` URLs
    are accepted, under ``image_limits``), else None (images get a 400)."""
    tags = ThinkTags.of(tokenizer) if hasattr(tokenizer, "hf") else None
    if config.reasoning_parser is not None and tags is None:
        raise ValueError(f"reasoning parser {config.reasoning_parser!r} needs a tokenizer that "
                         "spells <think> and </think>; this checkpoint's does not")
    app = FastAPI(title="trimode", version="0.1.0",
                  description="OpenAI-compatible server for tri-mode diffusion LMs")
    metrics = Metrics(engine)
    app.state.metrics, app.state.engine, app.state.config = metrics, engine, config
    app.add_middleware(Guard, max_body_bytes=config.max_body_bytes, on_error=lambda path:
                       metrics.requests.labels(_endpoint_of(path), "none", "500").inc())

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        status, message, param = _describe(exc.errors())
        metrics.requests.labels(_endpoint(request), "none", str(status)).inc()
        return JSONResponse(error_body(message, param), status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        status, message = exc.status_code, str(exc.detail)
        cause = exc.__cause__
        if isinstance(cause, UnicodeDecodeError):  # FastAPI's 400 for a body it cannot read
            status = 422  # as for any body that is not JSON
            message = (f"the body is not valid JSON: it is not UTF-8 (byte "
                       f"0x{cause.object[cause.start]:02X} at offset {cause.start})")
        if request.method == "POST":
            metrics.requests.labels(_endpoint(request), "none", str(status)).inc()
        return JSONResponse(error_body(message, None, kind), status_code=status,
                            headers=getattr(exc, "headers", None))

    if config.ui:
        _mount_ui(app)

    @app.get("/health")
    async def health():
        """200 while the engine answers; 503 once its tensor-parallel group is down."""
        engine.stats()
        failure = getattr(getattr(getattr(engine, "engine", None), "model", None), "failure", None)
        if failure:
            return JSONResponse(error_body(f"tensor-parallel group is down: {failure}", None,
                                           "service_unavailable"), status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": 0, "owned_by": "trimode",
            "max_model_len": config.max_model_len}]}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _serve(request, body, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _serve(request, body, "chat")

    async def _serve(request: Request, body, endpoint: str):
        mode = body.mode or config.mode
        try:
            _check_counts(body, endpoint)  # before any tokenizing
            # tokenizing (and decoding images) takes a while: off the event loop
            jobs, prompt_tokens = await asyncio.to_thread(_jobs, body, endpoint)
        except RequestError as exc:
            metrics.requests.labels(endpoint, mode, str(exc.status)).inc()
            return JSONResponse(error_body(str(exc), exc.param, exc.kind), status_code=exc.status)
        meta = {"id": f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": config.model_name}
        run = Run(engine, jobs, tokenizer, metrics, endpoint, mode, time.perf_counter(),
                  sum(map(len, prompt_tokens)), tags)
        watcher = asyncio.create_task(abort_on_disconnect(request, run))
        if body.stream:
            options = body.stream_options
            include_usage = bool(options and options.include_usage)
            forwards = bool(options and options.trimode_events)
            return StreamingResponse(run.sse(meta, sum(map(len, prompt_tokens)), include_usage,
                                             watcher, forwards),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        try:
            result = await run.collect(meta, sum(map(len, prompt_tokens)))
        finally:
            watcher.cancel()
        return JSONResponse(result, status_code=200 if "error" not in result else 500)

    def _check_counts(body, endpoint: str) -> None:
        """The cheap checks that bound a request's work, before anything is tokenized."""
        body.unsupported()
        if body.model is not None and body.model != config.model_name:
            raise RequestError(f"model {body.model!r} is not served here; the model is "
                               f"{config.model_name!r} (GET /v1/models)", "model")
        body.stop_strings()
        n_prompts = 1
        if endpoint == "completions":
            prompt = body.prompt
            single = isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
            n_prompts = 1 if single else len(prompt)
            limit = config.max_model_len
            for p in ([prompt] if single else prompt):
                if limit is not None and not isinstance(p, str) and len(p) > limit:
                    raise RequestError(f"prompt has {len(p)} token ids; the context limit is "
                                       f"{limit}", "prompt")
        if n_prompts * body.n > MAX_CHOICES:
            raise RequestError(f"prompts x n = {n_prompts} x {body.n} = {n_prompts * body.n} "
                               f"choices; at most {MAX_CHOICES} per request",
                               "n" if n_prompts <= MAX_CHOICES else "prompt")

    def _jobs(body, endpoint: str) -> tuple[list[Job], list[list[int]]]:
        """Validate everything and build one Job per choice (prompt-major, then n). Runs in a
        worker thread: it tokenizes."""
        stop = body.stop_strings()
        images = None
        if endpoint == "completions":
            prompts = _prompt_ids(body)
        else:
            ids, images = _chat_ids(body)
            prompts = [ids]
        field = "prompt" if endpoint == "completions" else "messages"
        jobs = []
        for p, ids in enumerate(prompts):
            for j in range(body.n):
                params = _params(body, j)
                extra = {"images": images} if images else {}
                _check(lambda: engine.validate(ids, params, **extra), field)
                parse = config.reasoning_parser is not None and endpoint == "chat"
                jobs.append(Job(p * body.n + j, ids, params, f"{uuid.uuid4().hex}-{p}-{j}", stop,
                                images or None, tags if parse else None))
        return jobs, prompts

    def _prompt_ids(body: CompletionRequest) -> list[list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise RequestError("prompt must not be empty", "prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                if not p:
                    raise RequestError("prompt must not be empty", "prompt")
                ids = tokenizer.encode(p)
                if not ids:
                    raise RequestError("prompt has no tokens", "prompt")
            else:
                ids = _check(lambda: tokenizer.check_ids(list(p), vocab_size), "prompt")
            out.append(ids)
        return out

    def _chat_ids(body: ChatCompletionRequest) -> tuple[list[int], list]:
        messages = [{"role": m.role, "content": m.parts()} for m in body.messages]
        kwargs = body.chat_template_kwargs
        if all(isinstance(m["content"], str) for m in messages):
            return _check(lambda: tokenizer.apply_chat_template(messages, kwargs), "messages"), []
        return _check(lambda: chat_prompt(tokenizer, vision, messages, image_limits, kwargs),
                      "messages")

    def _params(body: _Sampling, j: int) -> SamplingParams:
        mode = body.mode or config.mode
        threshold = body.threshold if body.threshold is not None else config.threshold
        if threshold is None:  # the mode's own default (defaults.THRESHOLD), as in the CLI
            threshold = MODE_DEFAULT
        top_k = config.top_k if body.top_k is None else max(body.top_k, 0)
        kwargs = dict(
            mode=mode, max_tokens=body.max_tokens or body.max_completion_tokens or config.max_tokens,
            temperature=config.temperature if body.temperature is None else body.temperature,
            top_p=config.top_p if body.top_p is None else body.top_p, top_k=top_k,
            seed=None if body.seed is None else body.seed + j,
            block_length=body.block_length or config.block_length, threshold=threshold,
            logprobs=body.n_logprobs(), unmask=body.unmask or UNMASK, steps=body.steps,
            max_thinking_tokens=config.max_thinking_tokens if body.max_thinking_tokens is None
            else body.max_thinking_tokens)
        return _check(lambda: SamplingParams(**kwargs), None)

    return app


def _mount_ui(app: FastAPI) -> None:
    """The playground: ``GET /`` (index.html) and its scripts and styles under ``/ui/``,
    served from the package's own files (nothing is fetched from elsewhere)."""
    from pathlib import Path

    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    folder = Path(__file__).parent / "ui"

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(folder / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    app.mount("/ui", StaticFiles(directory=folder), name="ui")


def _check(fn, field: str | None):
    """Run ``fn``; a ValueError becomes a 400 naming the field: the one it carries
    (``ParamError.field``: the input to change, e.g. max_tokens for the context limit), else
    the one its message starts with, else ``field``."""
    try:
        return fn()
    except RequestError:
        raise
    except ValueError as exc:
        message = " ".join(str(exc).split())
        first = getattr(exc, "field", None) or message.split(" ", 1)[0].strip(":,")
        first = first.split("[", 1)[0]
        param = first if first in _Sampling.model_fields or \
            first in ("logprobs", "chat_template_kwargs") else field
        if first == "prompt" and field == "messages":
            param = "messages"
        raise RequestError(message, param) from None


def _describe(errors) -> tuple[int, str, str | None]:
    """(status, message, param) for pydantic errors: 422 when every error is about the
    body's shape or types, else 400 (a value out of range, NaN, an unknown mode)."""
    def is_schema(e) -> bool:
        return e["type"] in SCHEMA_ERRORS or e["type"].endswith(("_type", "_parsing"))

    schema = all(is_schema(e) for e in errors)
    # a value error inside a union member that matched (a text part's text) says more than
    # the other members' type errors
    errors = sorted(errors, key=is_schema)
    first = errors[0]
    if first["type"] == "json_invalid":
        return 422, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    loc = loc[:1] + [x for x in loc[1:] if x.isdigit() or x.isidentifier() and x not in UNION_TAGS]
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    message = f"{where}: {first['msg']}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return (422 if schema else 400), message, param


def _endpoint(request: Request) -> str:
    return _endpoint_of(request.url.path)


def _endpoint_of(path: str) -> str:
    if path.endswith("chat/completions"):
        return "chat"
    return "completions" if path.endswith("/completions") else path
