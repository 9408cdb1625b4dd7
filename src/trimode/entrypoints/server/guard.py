"""ASGI middleware between uvicorn and the app's routes: a cap on the request body and a
catch-all for exceptions that escape a route.

A body over ``max_body_bytes`` is refused with 413 before it is read in full (by its
Content-Length, or as it arrives when chunked). An exception that escapes a route (a bug)
becomes an OpenAI-style 500 JSON body, is logged and counted by ``on_error``, and the
connection stays usable: uvicorn closes a keep-alive connection only when an exception
reaches it, and none does. Knows nothing about OpenAI formats beyond ``error_body``.
"""

from __future__ import annotations

import json
import logging

from starlette.exceptions import HTTPException

from .protocol import error_body

log = logging.getLogger("trimode.server")


class BodyTooLarge(HTTPException):
    """Raised while reading a body over the cap; an HTTPException, so FastAPI's body
    parsing passes it through unchanged (it turns other errors into a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the server's limit of {limit} bytes")


class Guard:
    """``Guard(app, max_body_bytes, on_error)``; ``on_error(path)`` counts a 500."""

    def __init__(self, app, max_body_bytes: int, on_error):
        self.app, self.limit, self.on_error = app, max_body_bytes, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _respond(send, 413, BodyTooLarge(self.limit).detail)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception as exc:  # noqa: BLE001 - the catch-all: answer, never drop the socket
            log.exception("internal error on %s", scope.get("path"))
            self.on_error(scope.get("path", ""))
            if not started:
                await _respond(send, 500, f"internal error: {type(exc).__name__}",
                               "internal_server_error")


async def _respond(send, status: int, message: str, kind: str = "invalid_request_error"):
    body = json.dumps(error_body(message, None, kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
