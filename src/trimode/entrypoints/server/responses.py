"""One HTTP request's choices turned into an OpenAI response: collected into one JSON body,
or streamed as server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``).

``Run`` records each choice's events (text, tokens, logprobs, finish_reason, metrics), feeds
the Prometheus metrics, and on any exit of a stream (finished, client gone, cancelled) aborts
the engine requests that have not finished. ``abort_on_disconnect`` aborts them as soon as
the client goes away, streaming or not.
"""

from __future__ import annotations

import json
import logging
import time

from fastapi import Request

from ...decoding.thinking import split
from .format import Choice, chunk, chunk_choice, full_choice, summary, usage
from .events import event_json
from .generation import (ChoiceEvent, Forward, Job, abort, merge, run_choice,
                         until_disconnect)
from .metrics import Metrics
from .protocol import error_body

log = logging.getLogger("trimode.server")


async def abort_on_disconnect(request: Request, run: "Run") -> None:
    """Wait for the client to go away, then abort every engine request of ``run``."""
    await until_disconnect(request.receive)
    run.disconnected = True
    for job in run.jobs:
        abort(run.engine, job.request_id)


class Run:
    """The choices of one HTTP request, collected (non-stream) or streamed (SSE)."""

    def __init__(self, engine, jobs: list[Job], tokenizer, metrics: Metrics, endpoint: str,
                 mode: str, start: float, prompt_tokens: int = 0, think_tags=None):
        self.engine, self.jobs, self.tokenizer, self.metrics = engine, jobs, tokenizer, metrics
        self.endpoint, self.mode, self.start = endpoint, mode, start
        self.prompt_tokens = prompt_tokens
        self.think_tags = think_tags  # counts usage's reasoning_tokens (None: not counted)
        self.choices = {j.index: Choice(j.index, reasoning="" if j.think_tags else None)
                        for j in jobs}
        self.disconnected = False
        self.first_text_at: float | None = None

    def events(self, forwards: bool = False):
        """Choice events as they come; with ``forwards``, per-forward ``Forward``s too."""
        return merge([run_choice(self.engine, j, self.tokenizer.decode, forwards)
                      for j in self.jobs])

    def _record(self, event: ChoiceEvent) -> Choice:
        choice = self.choices[event.index]
        choice.add(event, self.tokenizer)
        if event.text and self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        if event.finish_reason is not None:
            self.metrics.choice(choice.mode or self.mode, len(choice.token_ids), choice.metrics)
        return choice

    def _finish(self, status: int) -> None:
        """Count the request under the mode that ran (what ``auto`` chose; the requested
        mode if the choices differ or none started), the same label for every counter."""
        modes = {c.mode for c in self.choices.values() if c.mode}
        mode = modes.pop() if len(modes) == 1 else self.mode
        status = 499 if self.disconnected else status
        self.metrics.requests.labels(self.endpoint, mode, str(status)).inc()
        self.metrics.prompt_tokens.labels(mode).inc(self.prompt_tokens)
        if status == 200:
            if self.first_text_at is not None:
                self.metrics.ttft.labels(mode).observe(self.first_text_at - self.start)
            self.metrics.latency.labels(mode).observe(time.perf_counter() - self.start)

    def _usage(self, prompt_tokens: int, choices: list[Choice]) -> dict:
        reasoning = None
        if self.think_tags is not None:
            prompts = {j.index: j.prompt_ids for j in self.jobs}
            reasoning = sum(len(split(self.think_tags, prompts[c.index], c.token_ids)[0])
                            for c in choices)
        return usage(prompt_tokens, choices, reasoning)

    async def collect(self, meta: dict, prompt_tokens: int) -> dict:
        try:
            async for event in self.events():
                self._record(event)
        except Exception as exc:  # the engine failed: a 500 for this request only
            log.exception("request %s failed", meta["id"])
            self._finish(500)
            return error_body(f"internal error: {type(exc).__name__}: {exc}", None,
                              "internal_server_error")
        self._finish(200)
        choices = [self.choices[i] for i in sorted(self.choices)]
        return {**meta, "object": "chat.completion" if self.endpoint == "chat" else "text_completion",
                "choices": [full_choice(c, self.endpoint, self.tokenizer) for c in choices],
                "usage": self._usage(prompt_tokens, choices), "trimode": summary(choices)}

    async def sse(self, meta: dict, prompt_tokens: int, include_usage: bool, watcher,
                  forwards: bool = False):
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        status = 200
        try:
            if self.endpoint == "chat":
                roles = [{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None} for i in sorted(self.choices)]
                yield _sse(chunk(meta, obj, roles))
            async for event in self.events(forwards):
                if isinstance(event, Forward):
                    yield _sse({**chunk(meta, "trimode.forward", []),
                                "trimode_event": event_json(event.index, event.event,
                                                            self.tokenizer)})
                    continue
                choice = self._record(event)
                if event.text or event.reasoning or event.finish_reason is not None \
                        or event.logprobs:
                    yield _sse(chunk(meta, obj, [chunk_choice(choice, event, self.endpoint,
                                                              self.tokenizer)]))
            if include_usage:
                choices = [self.choices[i] for i in sorted(self.choices)]
                yield _sse({**chunk(meta, obj, []), "usage": self._usage(prompt_tokens, choices),
                            "trimode": summary(choices)})
        except Exception as exc:
            log.exception("stream %s failed", meta["id"])
            status = 500
            yield _sse(error_body(f"internal error: {type(exc).__name__}: {exc}", None,
                                  "internal_server_error"))
        finally:
            watcher.cancel()
            for job in self.jobs:  # a cancelled stream: nothing may keep running
                if self.choices[job.index].finish_reason is None:
                    abort(self.engine, job.request_id)
            self._finish(status)
        yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"
