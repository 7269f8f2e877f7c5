"""JSON errors from Ray Serve's own HTTP proxy.

The proxy answers some requests itself, as plain text: 503 when requests are dropped for
backpressure or no replica is up, 408 on its request timeout, 404 outside every route, and an
empty 500 when a replica dies mid-request. Ray Serve applies the Starlette middlewares returned by
the function that ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names, in every proxy process;
:func:`middlewares` returns :class:`JSONErrors`, which turns those answers into the app's own form,
``{"error": ...}``, keeping status and headers (``Retry-After`` included). ``distunmix serve`` sets
the variable before it starts Ray (:func:`enable`); ``serve run`` and clusters need it in the
environment Ray starts from (see the README).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from starlette.middleware import Middleware

log = logging.getLogger(__name__)

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "distunmix.serve.proxy:middlewares"
MAX_TEXT = 4096  # bytes of a plain-text answer kept as the message
MESSAGES = {  # for answers without a text of their own
    500: "a replica failed while handling this request (it is being replaced); try again",
    502: "no replica could answer; try again shortly",
    503: "the service is unavailable; try again shortly",
}


def middlewares() -> list[Middleware]:
    """The proxy callback: Ray Serve wraps its HTTP proxy in these."""
    return [Middleware(JSONErrors)]


def enable() -> None:
    """Have the proxies of a Ray instance started from this process answer JSON errors."""
    os.environ.setdefault(CALLBACK_ENV, CALLBACK)


class JSONErrors:
    """ASGI middleware: an HTTP error answer (status >= 400) that is not JSON becomes
    ``{"error": "<its text>"}``; an app that ends without answering gets a JSON 500."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}  # the start of an answer being rewritten, and its text
        started = False

        async def rewrite(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                headers = [(k.lower(), v) for k, v in message.get("headers", [])]
                ctype = dict(headers).get(b"content-type", b"")
                if message["status"] >= 400 and not ctype.startswith(b"application/json"):
                    held.update(status=message["status"], headers=headers, text=b"")
                    return
                started = True
                await send(message)
            elif message["type"] == "http.response.body" and held:
                held["text"] = (held["text"] + message.get("body", b""))[:MAX_TEXT]
                if not message.get("more_body", False):
                    await _send_json(send, held["status"], held["headers"], held["text"])
                    held.clear()
                    started = True
            else:
                await send(message)

        try:
            await self.app(scope, receive, rewrite)
        except Exception:
            log.exception("the proxy failed on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await _send_json(send, 500, [], b"")
            return
        if not started:
            await _send_json(send, held.get("status", 500), held.get("headers", []), held.get("text", b""))


async def _send_json(send: Any, status: int, headers: list[tuple[bytes, bytes]], text: bytes) -> None:
    message = text.decode(errors="replace").strip() or MESSAGES.get(status, "the request failed")
    body = json.dumps({"error": message}).encode()
    keep = [(k, v) for k, v in headers if k not in (b"content-type", b"content-length")]
    out = [*keep, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})
