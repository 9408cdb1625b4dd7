"""One HTTP request's choices run on the engine: committed tokens in, final text events out.

``run_choice`` drives one engine request and turns its updates into ``ChoiceEvent``s through a
``TextStream`` (stop strings, whole characters), or a ``ReasoningStream`` (the same, with
the thinking split off) when a reasoning parser is on. On a stop-string match it aborts the engine
request (finish_reason ``"stop"``); when the consumer goes away (client disconnect,
cancellation, error) it aborts it too, so its KV is freed within one engine step. ``merge``
runs several choices concurrently and yields their events as they come. Knows nothing about
HTTP or the OpenAI formats.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from ...decoding.events import ForwardEvent
from .text import ReasoningStream, TextStream

log = logging.getLogger("trimode.server")


@dataclass
class Job:
    """One choice: an engine request. ``index`` is the choice index in the response."""

    index: int
    prompt_ids: list[int]
    params: object  # SamplingParams
    request_id: str
    stop: list[str] = field(default_factory=list)
    images: list | None = None  # ImageInputs filling the prompt's image pads (NLD-VLM)
    think_tags: object | None = None  # ThinkTags: split reasoning from the answer (parser on)


@dataclass
class ChoiceEvent:
    """Final output of one choice since its previous event.

    token_ids / logprobs: tokens consumed by this event (logprobs aligned, or None).
    finish_reason: set on the choice's last event only; mode, metrics: from the engine.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list | None
    finish_reason: str | None
    mode: str | None
    metrics: object | None
    reasoning: str = ""  # reasoning text (a reasoning parser is on; ``text`` is the answer)


@dataclass
class Forward:
    """A per-forward event (``decoding.events.ForwardEvent``) of choice ``index``."""

    index: int
    event: object


async def run_choice(engine, job: Job, decode,
                     events: bool = False) -> AsyncIterator[ChoiceEvent | Forward]:
    """Events of one choice, the last one with a finish_reason. ``decode(ids) -> str``.
    With ``events``, also a ``Forward`` for every model forward of the choice."""
    stream = TextStream(decode, job.stop) if job.think_tags is None \
        else ReasoningStream(decode, job.stop, job.think_tags, job.prompt_ids)
    extra = {"images": job.images} if job.images else {}
    if events:
        extra["events"] = True
    updates = engine.generate(job.prompt_ids, job.params, job.request_id, **extra)
    engine_done = False
    try:
        async for upd in updates:
            if isinstance(upd, ForwardEvent):
                yield Forward(job.index, upd)
                continue
            engine_done = bool(upd.finished)
            if upd.finish_reason == "error":  # the engine failed this request only
                raise RuntimeError(getattr(upd, "error", None) or "the engine failed the request")
            ids, lps = [], [] if upd.new_logprobs is not None else None
            for k, token in enumerate(upd.new_token_ids):
                ids.append(token)
                if lps is not None:
                    lps.append(upd.new_logprobs[k])
                if stream.add(token):
                    break
            reason = "stop" if stream.stopped else upd.finish_reason if upd.finished else None
            if upd.finished and not stream.stopped:
                stream.close()
            event = ChoiceEvent(job.index, stream.take(), ids, lps, reason, upd.mode, upd.metrics,
                                getattr(stream, "take_reasoning", str)())
            if reason is not None:
                yield event
                return
            if event.text or event.reasoning or ids:
                yield event
        raise RuntimeError(f"engine request {job.request_id} ended without a finish_reason")
    finally:
        if not engine_done:
            abort(engine, job.request_id)
        await updates.aclose()


def abort(engine, request_id: str) -> None:
    try:
        engine.abort(request_id)
    except Exception:  # already finished or unknown: nothing left to free
        log.debug("abort %s failed", request_id, exc_info=True)


_DONE = object()


async def merge(streams: list[AsyncIterator[ChoiceEvent]]) -> AsyncIterator[ChoiceEvent]:
    """Events of several choices as they come; cancels (and so aborts) the rest on exit."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(stream):
        try:
            async for item in stream:
                queue.put_nowait(item)
        except Exception as exc:  # noqa: BLE001  (re-raised by the consumer)
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_DONE)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(receive) -> None:
    """Return when the ASGI client disconnects (the request body is already read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
