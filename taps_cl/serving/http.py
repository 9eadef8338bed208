"""MLflow's scoring server for a routed model, with a guard in front (what ``taps-cl serve`` runs).

The app is MLflow's own (:func:`mlflow.pyfunc.scoring_server.init`: ``/invocations``,
``/ping``, ``/health``, ``/version``; the same request formats as ``mlflow models serve``).
:class:`RequestGuard` adds what a bare scoring server lacks in front of it:

- a request body over ``max_body_bytes`` is refused with 413 while it streams in (it is never
  parsed, and never buffered past the limit);
- every error response is one line of JSON (``error_code``, ``message``): MLflow's messages
  quote the whole request (and a stack trace), which can be megabytes of base64 and leaks
  internals;
- every request is logged through the ``taps_cl.serving`` logger (method, path, status, bytes,
  milliseconds).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_BODY_BYTES", "RequestGuard", "build_app", "one_line_error"]

DEFAULT_BODY_BYTES = 96 * 2**20  # JSON body: base64 of the default 64 MiB of images, and slack
log = logging.getLogger("taps_cl.serving")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]


class _TooLarge(Exception):
    pass


def one_line_error(body: bytes, status: int) -> bytes:
    """An error response body reduced to ``{"error_code", "message"}`` with a one-line message
    (MLflow prefixes a model's message with ``Failed to predict data '<the request>'``)."""
    try:
        err = json.loads(body)
        message, code = str(err.get("message", "")), str(err.get("error_code", ""))
    except (ValueError, AttributeError):
        message, code = body.decode("utf-8", "replace"), ""
    if "\nError: " in message:  # "Failed to predict data '...'. \nError: <the model's message>"
        message = message.rsplit("\nError: ", 1)[1]
    lines = [line for line in message.strip().splitlines() if line.strip()]
    text = (lines[0] if lines else f"HTTP {status}")[:500]
    return json.dumps({"error_code": code or f"HTTP_{status}", "message": text}).encode()


class RequestGuard:
    """ASGI middleware: body limit, one-line errors and request logging (module docstring)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_BODY_BYTES) -> None:
        if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be an int >= 1, got {max_body_bytes!r}")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Message, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, seen, state = time.perf_counter(), [0], {"status": 0, "started": False}
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            await self._refuse(send, state, declared)
            return self._log(scope, state["status"], 0, start)

        async def limited() -> Message:
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if seen[0] > self.max_body_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, self._sender(send, state))
        except _TooLarge:
            if not state["started"]:
                await self._refuse(send, state, b"chunked")
        self._log(scope, state["status"], seen[0], start)

    def _sender(self, send: Callable, state: dict) -> Callable:
        held: dict[str, Any] = {}

        async def guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                if message["status"] < 400:
                    return await send(message)
                held["start"], held["body"] = message, b""
                return None
            if message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return None
                await _send_json(send, held["start"]["status"],
                                 one_line_error(held["body"], held["start"]["status"]))  # fmt: skip
                return None
            return await send(message)

        return guarded

    async def _refuse(self, send: Callable, state: dict, declared: bytes) -> None:
        state["status"] = 413
        what = "a body of unknown size" if not declared.isdigit() else f"{int(declared)} bytes"
        message = f"request body ({what}) is over the limit of {self.max_body_bytes} bytes"
        body = json.dumps({"error_code": "REQUEST_TOO_LARGE", "message": message}).encode()
        await _send_json(send, 413, body)

    @staticmethod
    def _log(scope: Message, status: int, nbytes: int, start: float) -> None:
        ms = (time.perf_counter() - start) * 1e3
        log.info("%s %s %d %dB %.1fms", scope.get("method"), scope.get("path"), status, nbytes, ms)


async def _send_json(send: Callable, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build_app(model_dir: str | Path, max_body_bytes: int = DEFAULT_BODY_BYTES) -> RequestGuard:
    """MLflow's scoring app for the pyfunc model in ``model_dir``, behind a guard."""
    from mlflow.pyfunc import load_model, scoring_server

    return RequestGuard(scoring_server.init(load_model(str(model_dir))), max_body_bytes)
