"""The OpenAI request bodies (pydantic) and the OpenAI error body.

Follows the OpenAI API reference for ``/v1/completions`` and ``/v1/chat/completions``, plus
trimode's extras at the top level of the body (``mode``, ``block_length``, ``threshold``,
``unmask``, ``steps``, ``top_k``), which OpenAI clients send through ``extra_body``. Ranges live in the schema, so the
OpenAPI document states them and a violation is reported before anything runs; NaN and
infinity are rejected for every number (docs/cases.md B25). Types are strict: a boolean or a
string is not a number and ``true`` is not a token id (422, as every type mismatch). Every text
field (prompts, message contents and text parts, stop strings) must be valid Unicode: a lone
surrogate such as the JSON escape ``"\\ud800"`` is a 400 naming the field, before anything
reaches the tokenizer. Unknown fields are ignored, as in vLLM. Knows nothing about the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from ...checkpoint.tokenizer import check_text

from ...defaults import AUTO, DECODING_MODES, UNMASK_POLICIES

SERVER_MODES = (AUTO,) + DECODING_MODES
Mode = Literal[SERVER_MODES]  # type: ignore[valid-type]
Unmask = Literal[UNMASK_POLICIES]  # type: ignore[valid-type]
MAX_N = 64  # choices per request: each is an engine request holding KV
MAX_TOP_LOGPROBS = 20
MAX_BLOCK_LENGTH = 1024
MAX_STOP = 16


def _texts(value, field: str):
    """Check every string inside ``value`` (a string or nested lists) with check_text."""
    if isinstance(value, str):
        check_text(value, field)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _texts(item, f"{field}[{i}]")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: StrictBool = False
    trimode_events: StrictBool = Field(False, description="trimode: one extra chunk per model "
                                       "forward (object trimode.forward; README 'Live events')")


class _Sampling(BaseModel):
    """Fields shared by both endpoints. None means the server's default (its flags)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(None, description="the served model name (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="generated-token limit")
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False,
                                      description="0 is greedy; otherwise >= 1e-4")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: off")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, description="up to 16 non-empty strings; the "
                                         "output ends before the first one (not included)")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, allow_inf_nan=False, description="only 0")
    frequency_penalty: float | None = Field(None, allow_inf_nan=False, description="only 0")
    logit_bias: dict[str, float] | None = Field(None, description="not supported; only {}")
    mode: Mode | None = Field(None, description="trimode: decoding mode; auto picks by load")
    block_length: int | None = Field(None, ge=1, le=MAX_BLOCK_LENGTH,
                                     description="trimode: diffusion block / draft window")
    threshold: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                    description="trimode: unmask / draft confidence threshold")
    unmask: Unmask | None = Field(None, description="trimode: diffusion's unmasking order: "
                                  "confidence (default), margin, entropy, random, leftmost")
    steps: int | None = Field(None, ge=1, description="trimode: diffusion passes per block (the "
                              "quota schedule; no threshold unless one is given)")
    max_thinking_tokens: int | None = Field(None, ge=0, description="trimode: at most this many "
                                            "tokens inside <think>, then </think> is forced")

    @field_validator("stop")
    @classmethod
    def _stop_text(cls, value):
        return _texts(value, "stop")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise RequestError(f"stop takes at most {MAX_STOP} strings; got {len(stops)}", "stop")
        if any(s == "" for s in stops):
            raise RequestError("stop strings must not be empty", "stop")
        return stops

    def unsupported(self) -> None:
        """Raise RequestError for an OpenAI option set to a value trimode cannot honour."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise RequestError(f"{name} is not supported; it must be 0 or absent", name)
        if self.logit_bias:
            raise RequestError("logit_bias is not supported; it must be empty or absent",
                               "logit_bias")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise RequestError("max_tokens and max_completion_tokens differ; send one",
                               "max_completion_tokens")


class CompletionRequest(_Sampling):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]] = Field(
        ..., description="text, token ids, or a list of either (one result per prompt)")
    logprobs: bool | int | None = Field(None, description="number of top alternatives per "
                                        "token, 0..20 (true: top_logprobs or 0)")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = Field(False, description="not supported; only false")
    best_of: int | None = Field(None, description="not supported beyond n")
    suffix: str | None = Field(None, description="not supported")

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value):
        return _texts(value, "prompt")

    def n_logprobs(self) -> int | None:
        if self.logprobs is None or self.logprobs is False:
            if self.top_logprobs:
                raise RequestError("top_logprobs needs logprobs (true or 0..20)", "top_logprobs")
            return None
        if self.logprobs is True:
            return self.top_logprobs or 0
        if not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] or a "
                               f"boolean; got {self.logprobs}", "logprobs")
        return self.logprobs

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise RequestError("echo is not supported; it must be false", "echo")
        if self.suffix:
            raise RequestError("suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of is not supported; it must equal n or be absent",
                               "best_of")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _valid(cls, value):
        return check_text(value, "text")


class ImageURL(BaseModel):
    url: str = Field(..., description="a data:image/...;base64 URL (remote URLs are refused)")
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None

    @field_validator("content")
    @classmethod
    def _valid(cls, value):
        return check_text(value, "content") if isinstance(value, str) else value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if isinstance(p, TextPart))
        return self.content or ""

    def parts(self) -> str | list[dict]:
        """The content for ``multimodal.prompt``: a string, or parts with images."""
        if isinstance(self.content, list) and any(isinstance(p, ImagePart) for p in self.content):
            return [p.model_dump(exclude_none=True) for p in self.content]
        return self.text()


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict] | None = Field(None, description="not supported; only [] or absent")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="extra chat template variables, e.g. {\"enable_thinking\": false}")

    def n_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
            return None
        return self.top_logprobs or 0

    def unsupported(self) -> None:
        super().unsupported()
        if self.tools:
            raise RequestError("tools are not supported", "tools")


class RequestError(ValueError):
    """A bad request: HTTP ``status`` with an OpenAI error body naming ``param``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: int | str | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``. A message
    that echoes invalid text (a lone surrogate) is escaped, so the body is always UTF-8."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
