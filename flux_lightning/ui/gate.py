"""The gate in front of every HTTP request of the web UI (ASGI middleware): who may talk to the API.

The token (header, query or the page's cookie), a loopback ``Host`` when bound to loopback, changes
only as JSON from this page (``Content-Type``, ``Origin``), bodies of at most ``max_body`` bytes.
What a request may then do is the API's (:mod:`server`) and :mod:`policy`'s.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse

COOKIE = "flux_lightning_ui_token"
MAX_BODY = 1 << 20  # bytes of a request body


def is_loopback(host: str) -> bool:
    """True for the names and addresses that only this machine can reach."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _refusal_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Gate:
    """ASGI middleware in front of every HTTP request.

    - With a token: the request must carry it (header, query or the page's cookie).
    - Changes (POST) must be JSON, from this page: a ``Content-Type`` other than
      ``application/json`` or an ``Origin`` naming another site is refused, so no other web page
      open in the same browser can launch runs (a cross-site JSON request needs a CORS preflight,
      which this server never grants).
    - Bound to loopback, the ``Host`` header must be a loopback name, so a DNS-rebinding page
      cannot reach the UI under its own name.
    - A body is read whole, up to ``max_body`` bytes; a larger one is refused (413) unread.
    """

    def __init__(self, app, token: str | None, loopback: bool, max_body: int = MAX_BODY):
        self.app, self.token, self.loopback, self.max_body = app, token, loopback, max_body

    def _token_ok(self, request: Request) -> tuple[bool, bool]:
        """(accepted, came through the query string)."""
        header = request.headers.get("authorization", "")
        candidates = [
            (header[7:].strip() if header.lower().startswith("bearer ") else "", False),
            (request.query_params.get("token", ""), True),
            (request.cookies.get(COOKIE, ""), False),
        ]
        for given, from_query in candidates:
            if given and hmac.compare_digest(given.encode(), self.token.encode()):
                return True, from_query
        return False, False

    def _refusal(self, request: Request) -> JSONResponse | None:
        host = request.headers.get("host", "")
        if self.loopback and not is_loopback(host.rsplit(":", 1)[0] if not host.endswith("]") else host):
            return _refusal_response(
                403, f"Host {host!r} is not this machine's loopback name; open http://127.0.0.1:<port>/"
            )
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            if origin and origin.split("://", 1)[-1] != host:
                return _refusal_response(403, f"a request from {origin} (another site) cannot change anything here")
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return _refusal_response(415, "send JSON (Content-Type: application/json)")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refused = self._refusal(request)
        if refused is not None:
            return await refused(scope, receive, send)
        if self.token is not None:
            ok, from_query = self._token_ok(request)
            if not ok:
                response = _refusal_response(
                    401,
                    "this UI needs its token: open the URL printed at start (…/?token=<token>) "
                    "or send 'Authorization: Bearer <token>'",
                )
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
            if from_query and scope["path"] == "/":
                # the page keeps it: a cookie for its assets and <img> tags (the token leaves the URL bar)
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
                return await response(scope, receive, send)
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        return await self._limited(scope, receive, send)

    async def _limited(self, scope, receive, send):
        """The request with its body read whole (at most ``max_body`` bytes) and handed on; 413 beyond."""
        too_big = _refusal_response(
            413, f"the request body is larger than {self.max_body} bytes; this API takes small JSON objects"
        )
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
