"""Who is asking: a token given at the login page (then a session cookie) or a bearer header.

Rules:

1. The tokens are the API's (:mod:`services.api_access`): an account's token opens that account
   only, the admin token every account. Without any token configured, the console serves
   loopback addresses only and everyone there is the admin (``ANYONE``).
2. ``POST /login`` with a valid token opens a session: a fresh random id in a cookie that is
   ``HttpOnly``, ``SameSite=Strict`` and ``Secure`` when the console is served over TLS. The
   session lives in this process for ``SESSION_S`` at most; logging out ends it.
3. A request with ``Authorization: Bearer <token>`` (scripts, monitoring) is that token's
   caller for this request only; a wrong token is 401, whatever cookie comes with it.
4. Every request that changes something (not GET or HEAD) made with the session cookie
   carries the session's CSRF token (form field ``csrf`` or header ``X-CSRF-Token``), compared
   in constant time; without it: 403. A bearer request needs none: a browser never adds that
   header by itself. The login form carries a CSRF token of its own (a double-submit cookie).
5. A page asked for without a session goes to the login page; a JSON route answers 401.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import quote

from aiohttp import web

from services.cli.console.backend import ANYONE, CALLER, ApiAccess, Caller

SESSION_COOKIE = "prefsync_session"
LOGIN_COOKIE = "prefsync_login"
SESSION_S = 12 * 3600.0
MAX_SESSIONS = 10_000
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class Session:
    id: str
    caller: Caller
    csrf: str
    expires_at: float
    # messages for the next page shown (after a redirect): (kind, text), kind "ok" or "error"
    flashes: list[tuple[str, str]] = field(default_factory=list)


class Sessions:
    """The open sessions of this process (a restart logs everyone out)."""

    def __init__(self, *, lifetime_s: float = SESSION_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lifetime_s = lifetime_s
        self._clock = clock
        self._open: OrderedDict[str, Session] = OrderedDict()

    def open(self, caller: Caller) -> Session:
        session = Session(id=secrets.token_urlsafe(32), caller=caller,
                          csrf=secrets.token_urlsafe(32),
                          expires_at=self._clock() + self._lifetime_s)
        self._open[session.id] = session
        while len(self._open) > MAX_SESSIONS:
            self._open.popitem(last=False)
        return session

    def get(self, session_id: str) -> Session | None:
        session = self._open.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self._clock():
            del self._open[session_id]
            return None
        return session

    def close(self, session_id: str) -> None:
        self._open.pop(session_id, None)


SESSIONS_KEY = web.AppKey("sessions", Sessions)
ACCESS_KEY = web.AppKey("console_access", ApiAccess)
SESSION = web.RequestKey("session", Session)
BEARER = web.RequestKey("bearer", bool)


def same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def set_cookie(request: web.Request, response: web.StreamResponse, name: str, value: str) -> None:
    response.set_cookie(name, value, path="/", httponly=True, samesite="Strict",
                        secure=request.secure)


def session_of(request: web.Request) -> Session | None:
    return request.get(SESSION)


def flash(request: web.Request, kind: str, text: str) -> None:
    """A message for the page the browser is sent to next (a session's only)."""
    session = session_of(request)
    if session is not None:
        session.flashes.append((kind, text))


def csrf_token(request: web.Request) -> str:
    session = session_of(request)
    return session.csrf if session is not None else ""


def is_json_route(request: web.Request) -> bool:
    name = request.match_info.route.name or ""
    return name.startswith("api-")


def _unauthorised(request: web.Request) -> web.StreamResponse:
    if is_json_route(request) or request.method not in SAFE_METHODS:
        return web.json_response({"error": "a valid bearer token is required"}, status=401)
    # (a Location header as written: aiohttp's HTTPSeeOther would normalise the encoding)
    return web.Response(status=303,
                        headers={"Location": f"/login?next={quote(request.path_qs, safe='')}"})


def _caller_of(request: web.Request) -> tuple[Caller | None, bool]:
    """The caller and whether it came from a bearer header; (None, True): a bad header."""
    access = request.app[ACCESS_KEY]
    header = request.headers.get("Authorization")
    if header is not None:
        return access.caller(header), True
    session = request.app[SESSIONS_KEY].get(request.cookies.get(SESSION_COOKIE, ""))
    if session is not None:
        request[SESSION] = session
        return session.caller, False
    if not access.required:
        return ANYONE, False
    return None, False


PUBLIC = frozenset({"login", "static"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.name or ""
    if route.split(":")[0] in PUBLIC or request.match_info.http_exception is not None:
        return await handler(request)
    caller, bearer = _caller_of(request)
    if caller is None:
        if bearer:
            return web.json_response({"error": "a valid bearer token is required"}, status=401)
        return _unauthorised(request)
    request[CALLER] = caller
    request[BEARER] = bearer
    opened: Session | None = None
    if not bearer and session_of(request) is None:
        # no token configured (rule 1): a session all the same, for its CSRF token
        opened = request[SESSION] = request.app[SESSIONS_KEY].open(caller)
    if request.method not in SAFE_METHODS and not bearer:
        session = session_of(request)
        given = request.headers.get(CSRF_HEADER) or str(
            (await request.post()).get(CSRF_FIELD) or "")
        if opened is not None or session is None or not same(given, session.csrf):
            raise web.HTTPForbidden(text="The form has expired: go back, reload the page and "
                                         "try again.")
    response = await handler(request)
    if opened is not None:
        set_cookie(request, response, SESSION_COOKIE, opened.id)
    return response


def log_in(request: web.Request, token: str) -> Session | None:
    """A new session for a valid token (rule 2), else None."""
    caller = request.app[ACCESS_KEY].caller(f"Bearer {token}") if token else None
    if caller is None:
        return None
    old = request.cookies.get(SESSION_COOKIE)
    if old:
        request.app[SESSIONS_KEY].close(old)
    return request.app[SESSIONS_KEY].open(caller)


def log_out(request: web.Request) -> None:
    session = session_of(request)
    if session is not None:
        request.app[SESSIONS_KEY].close(session.id)


def login_nonce(request: web.Request) -> str:
    """The login form's CSRF token: the login cookie's value, or a new one."""
    return request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)


def check_login_nonce(request: web.Request, given: str) -> bool:
    expected = request.cookies.get(LOGIN_COOKIE, "")
    return bool(expected) and same(given, expected)


def safe_next(target: str) -> str:
    """Where to go after logging in: a path of this site only."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"
