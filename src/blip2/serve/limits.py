"""ASGI middleware: the request-body cap (counted while reading, so an oversized body is refused before it is
buffered whole) and per-route request metrics."""

from __future__ import annotations

import json
import time

from blip2.serve.metrics import Metrics

ROUTES = ("/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/caption", "/v1/ask", "/v1/itm",
          "/v1/retrieve", "/v1/search", "/health", "/metrics", "/")


def _error(status: int, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": status}}).encode()


async def _send_error(send, status: int, message: str) -> None:
    body = _error(status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Reads the whole body up to `max_bytes` and hands it on; past the cap it answers 413 at once. A declared
    Content-Length over the cap is refused before a byte of the body is read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"the request body is over the server's limit of {self.max_bytes} bytes (--max-body-mb)"
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _send_error(send, 400, "Content-Length is not a number")
                if declared > self.max_bytes:
                    return await _send_error(send, 413, too_big)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_error(send, 413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the real channel, so a disconnect is still seen

        return await self.app(scope, replay, send)


class RequestMetrics:
    """Counts every response by route and status and times it to its last byte (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"  # bounded label values, whatever clients request
        status = 500
        start = time.perf_counter()

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.request(route, status, time.perf_counter() - start)
