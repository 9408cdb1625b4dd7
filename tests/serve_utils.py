"""Helpers for server tests: run an app under uvicorn on 127.0.0.1 in a background thread,
and a scripted engine that plays back fixed token steps (several tokens per step, chosen
split points) through the AsyncEngine interface, for exact checks of the HTTP formats."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from trimode.outputs import RequestMetrics


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for servers started in another process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app, port: int = 0):
    """Serve ``app`` on 127.0.0.1:``port`` (0: a free port; a fixed one lets a test bring a
    server back on the same port); yields the base URL (``http://.../``)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@dataclass
class Update:
    new_token_ids: list[int]
    new_logprobs: list | None
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    mode: str
    metrics: RequestMetrics


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list = field(default_factory=list)


class ScriptedEngine:
    """``script(prompt_ids, params) -> (steps, finish_reason)``: each step is the list of
    token ids committed together. ``delay`` seconds between steps. Tracks live requests."""

    def __init__(self, script, delay: float = 0.0, limit: int = 64):
        self.script, self.delay, self.limit = script, delay, limit
        self.live: set[str] = set()
        self.aborted: set[str] = set()

    def validate(self, prompt_ids, params) -> None:
        if len(prompt_ids) + params.max_tokens > self.limit:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens "
                             f"({params.max_tokens}) exceeds the context limit {self.limit}")

    async def generate(self, prompt_ids, params, request_id):
        steps, reason = self.script(prompt_ids, params)
        self.live.add(request_id)
        done: list[int] = []
        metrics = RequestMetrics()
        try:
            for k, step in enumerate(steps):
                await asyncio.sleep(self.delay)
                if request_id in self.aborted:
                    yield Update([], None, list(done), True, "abort", params.mode, metrics)
                    return
                step = step[: params.max_tokens - len(done)]
                done += step
                metrics.nfe += 1
                metrics.generated_tokens = len(done)
                last = k == len(steps) - 1 or len(done) >= params.max_tokens
                lps = None if params.logprobs is None else [
                    TokenLogprob(t, -0.5, [(t, -0.5), (t + 1, -1.5)][: params.logprobs + 1])
                    for t in step]
                yield Update(step, lps, list(done), last,
                             ("length" if len(done) >= params.max_tokens else reason) if last
                             else None, params.mode, metrics)
                if last:
                    return
        finally:
            self.live.discard(request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def stats(self) -> dict:
        return {"running": len(self.live), "waiting": 0, "kv_rows_used": len(self.live),
                "kv_rows_total": 16, "kv_tokens_used": 0, "kv_tokens_total": 1024}
