"""Reads from other hosts need the token too when the dashboard listens beyond this machine:
a header, or the cookie ``/login`` sets. Requests from this machine pass (as on 127.0.0.1)."""

from __future__ import annotations

import hmac

from starlette.requests import cookie_parser
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

TOKEN_COOKIE = "lorafarm_token"
LOOPBACK_CLIENTS = {"127.0.0.1", "::1"}
OPEN_PATHS = ("/login", "/static/", "/healthz")


class ReadGuard:
    def __init__(self, app: ASGIApp, token: str):
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "GET":
            response = RedirectResponse("/login", 303)
        else:
            response = PlainTextResponse("refused: the token is missing or wrong (log in at /login "
                                         "or send the X-Lorafarm-Token header).", 403)
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        client = (scope.get("client") or ("", 0))[0]
        if client in LOOPBACK_CLIENTS or scope["path"].startswith(OPEN_PATHS):
            return True
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        given = (headers.get("x-lorafarm-token")
                 or cookie_parser(headers.get("cookie", "")).get(TOKEN_COOKIE))
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())
