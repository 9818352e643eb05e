"""The server's guard: one ASGI layer in front of every route.

In order, for every HTTP request:

1. a path that could climb out of a folder (``..``, a backslash, a NUL, an empty
   segment, or any of them percent-encoded once or twice) is refused with 400 before
   routing, whatever the route would have done with it;
2. each client address gets a token bucket (``rate`` requests per second, bursts of
   ``burst``): over it, 429 with ``Retry-After``;
3. with a token, ``/api`` and ``/dzi`` need ``Authorization: Bearer TOKEN`` or
   ``?token=TOKEN`` (compared in constant time): else 401;
4. bodies over ``max_body`` bytes are refused with 413, by their ``Content-Length``
   or, when they stream, as soon as they pass the limit;
5. every response carries ``nosniff``, a same-origin content security policy (the
   viewer loads nothing from elsewhere) and ``no-referrer`` (a token in a URL must not
   leak through Referer headers).

Unhandled errors become a JSON 500 without details; the trace goes to the log only.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from urllib.parse import parse_qsl, unquote

__all__ = ["Guard", "path_problem"]

log = logging.getLogger(__name__)

_PROTECTED = ("/api", "/dzi")
_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; object-src 'none'; "
     b"base-uri 'none'; frame-ancestors 'none'"),
]


def path_problem(raw_path: str) -> str | None:
    """Why a request path is refused (None: it is not): traversal in any encoding."""
    text = raw_path
    for _ in range(3):  # the raw form, once decoded, twice decoded
        lowered = text.lower()
        if "\x00" in lowered or "\\" in lowered:
            return "NUL or backslash in the path"
        segments = lowered.split("/")
        if any(s in ("..", ".") or s.startswith("..") or s.endswith("..") for s in segments):
            return "'..' or '.' in the path"
        if "//" in lowered:
            return "empty path segment"
        decoded = unquote(text)
        if decoded == text:
            return None
        if decoded.count("/") != text.count("/"):
            return "encoded '/' in the path"
        text = decoded
    return "path encoded more than twice"


class _TooLarge(BaseException):
    """Raised through the app from ``receive``: a BaseException, so no handler of the app's turns
    it into a body-parsing 400 on its way out."""


class _Buckets:
    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 if the request may go ahead, else seconds until it could."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._state.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1:
                self._state[client] = (tokens, now)
                return (1 - tokens) / self.rate
            self._state[client] = (tokens - 1, now)
            if len(self._state) > 10_000:  # forget idle clients
                self._state = {k: v for k, v in self._state.items() if now - v[1] < 60}
            return 0.0


async def _send_json(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *_HEADERS, *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: path checks, rate limit, token, body size, headers, opaque errors."""

    def __init__(self, app, *, token: str | None = None, max_body: int = 64 << 10, rate: float = 200.0,
                 burst: float = 1000.0):
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body
        self.buckets = _Buckets(rate, burst) if rate > 0 else None

    def _authorised(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                if hmac.compare_digest(value[7:].strip(), self.token):
                    return True
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
            if key == "token" and hmac.compare_digest(value.encode("latin-1", "replace"), self.token):
                return True
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = scope.get("raw_path") or scope["path"].encode()
        problem = path_problem(raw.decode("latin-1"))
        if problem is None:
            problem = path_problem(scope["path"])
        if problem is not None:
            return await _send_json(send, 400, f"bad request path: {problem}")
        if self.buckets is not None:
            client = (scope.get("client") or ("?", 0))[0]
            wait = self.buckets.take(client)
            if wait:
                return await _send_json(send, 429, "too many requests; slow down",
                                        [(b"retry-after", str(max(1, round(wait))).encode())])
        path = scope["path"]
        if self.token is not None and path.startswith(_PROTECTED) and not self._authorised(scope):
            return await _send_json(send, 401, "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                                               "or add ?token=TOKEN", [(b"www-authenticate", b"Bearer")])
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_body):
                return await _send_json(send, 413, f"request body over {self.max_body} bytes")

        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _TooLarge
            return message

        async def guarded_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *_HEADERS]}
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, f"request body over {self.max_body} bytes")
        except Exception:
            log.exception("error serving %s", path)
            if not started:
                await _send_json(send, 500, "internal error (see the server log)")
