"""``AsyncEngine``: an Engine stepped by a background thread, for servers and async callers.

Uses only the engine's public surface (add_request, abort, step, take_update, fail_all,
pop_finished, stats).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import replace
from functools import partial

from ..decoding.events import EventRecorder
from ..params import SamplingParams
from .engine import Engine

log = logging.getLogger("trimode.engine")


class AsyncEngine:
    """An Engine stepped by a background thread, for servers and async callers.

    ``generate`` is an async iterator of RequestUpdates; requests submitted from any event
    loop join the running batch at the next step. ``abort`` is thread-safe and takes effect
    before the next step (the request's KV row is freed within one step). Leaving the
    ``async for`` early (client disconnect, task cancellation) aborts the request.
    A failure inside a step ends the requests of that step with ``error``; the thread
    keeps serving. Do not call ``LLM.generate`` on the same LLM while this runs.
    """

    def __init__(self, llm_or_engine):
        self.engine: Engine = getattr(llm_or_engine, "engine", llm_or_engine)
        self.llm = llm_or_engine if hasattr(llm_or_engine, "engine") else None
        self._inbox: deque = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self._stats = self.engine.stats()
        self._ids = itertools.count()
        if self.llm is not None:
            self.llm._async = self

    def validate(self, prompt_ids: list[int], params: SamplingParams,
                 images: list | None = None) -> None:
        """Raise ValueError (naming the field) if the request could never run here."""
        self.engine.validate(prompt_ids, params, images)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, images: list | None = None,
                       events: bool = False):
        """Yield this request's RequestUpdates until it finishes (the last has
        ``finished=True``). With ``events``, also a ``decoding.events.ForwardEvent`` after
        every forward the request took part in (before that step's update). Raises
        ValueError for a request that can never run."""
        import asyncio

        self.validate(prompt_ids, params, images)
        request_id = f"async-{next(self._ids)}" if request_id is None else str(request_id)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._ensure_thread()
        if events and not params.trace:
            params = replace(params, trace=True)  # the recorder reads the trace
        with self._lock:
            self._inbox.append(("add", request_id, list(prompt_ids), params, loop, queue, images,
                                events))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a request from any thread (no-op if it already ended)."""
        with self._lock:
            self._inbox.append(("abort", str(request_id)))
        self._wake.set()

    def stats(self) -> dict:
        """Engine stats as of the last step (see Engine.stats)."""
        return dict(self._stats)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.llm is not None and getattr(self.llm, "_async", None) is self:
            self.llm._async = None

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="trimode-engine", daemon=True)
            self._thread.start()

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody listens any more
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)
        if isinstance(item, Exception) or item.finished:
            self._streams.pop(request_id, None)
            if request_id in self.engine.requests and self.engine.output(request_id).finished:
                self.engine.pop_finished(request_id)

    def _drain(self) -> None:
        with self._lock:
            items, self._inbox = list(self._inbox), deque()
        for item in items:
            if item[0] == "add":
                _, request_id, prompt_ids, params, loop, queue, images, events = item
                if request_id in self._streams or request_id in self.engine.requests:
                    # a duplicate id: refuse it without touching the request that owns it
                    loop.call_soon_threadsafe(queue.put_nowait, ValueError(
                        f"request_id {request_id!r} is already in use"))
                    continue
                self._streams[request_id] = (loop, queue)
                try:
                    hook = EventRecorder(partial(self._deliver, request_id)) if events else None
                    self.engine.add_request(prompt_ids, params, request_id, images=images,
                                            on_step=hook)
                except Exception as exc:  # noqa: BLE001 - delivered to the caller
                    self._deliver(request_id, exc if isinstance(exc, ValueError) else
                                  RuntimeError(f"{type(exc).__name__}: {exc}"))
            else:
                request_id = item[1]
                if self.engine.abort(request_id):
                    update = self.engine.take_update(self.engine.output(request_id))
                    if update is not None:
                        self._deliver(request_id, update)

    def _run(self) -> None:
        while not self._stop:
            self._drain()
            if not self.engine.has_unfinished():
                self._stats = self.engine.stats()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                updates = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - never let one bad step stop serving
                log.exception("engine step failed")
                updates = self.engine.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
            self._stats = self.engine.stats()
            for update in updates:
                self._deliver(update.request_id, update)
