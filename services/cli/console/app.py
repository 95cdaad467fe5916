"""``prefsync console``: the operator console, one aiohttp app with the pages and the read-only
JSON routes of the API (``prefsync api`` is the same app).

Access logs name the method, the path, the status, the size and the time taken, never an
email: contact pages carry the email in their path (and the search box in its query), so every
part of the path and query that holds an ``@`` (percent-encoded or not) is logged as
``<email>``. Neither the Referer nor any header is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from services.cli.console import auth, views
from services.cli.console.backend import (
    ApiAccess,
    Backend,
    Config,
    ConfigError,
    Secret,
    add_api_routes,
    check_bind,
    open_backend,
)
from services.cli.console.events import LiveRuns

HERE = Path(__file__).parent
ACCESS_LOG = logging.getLogger("prefsync.console.access")
_EMAILISH = re.compile(r"[^/?&=]*@[^/?&=]*")


def redact(target: str) -> str:
    """A request's path and query with every email-like part replaced by ``<email>``."""
    text = target
    for _ in range(3):  # a path carried in a query value is encoded twice (login's ?next=)
        decoded = unquote_plus(text)
        if decoded == text:
            break
        text = decoded
    return _EMAILISH.sub("<email>", text)


class AccessLogger(AbstractAccessLogger):
    """One line per request, emails redacted."""

    def log(self, request: Any, response: Any, time: float) -> None:
        path = redact(request.path_qs)
        self.logger.info(f"{request.method} {path} {response.status}", extra={
            "method": request.method, "path": path, "status": response.status,
            "bytes": response.body_length, "duration_ms": round(time * 1000, 1)})


def _is_json(exc: web.HTTPException) -> bool:
    return (exc.content_type or "").startswith("application/json")


@web.middleware
async def error_pages(request: web.Request, handler: auth.Handler) -> web.StreamResponse:
    """4xx answers of the pages as pages (the JSON routes keep their JSON)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or _is_json(exc) or auth.is_json_route(request):
            raise
        message = exc.text or exc.reason
        if message.startswith(f"{exc.status}:"):  # aiohttp's own text, e.g. "404: Not Found"
            message = {404: "There is no such page.",
                       405: "That is not something this page does."}.get(exc.status, exc.reason)
        return views.render(request, "error.html", status=exc.status, title=exc.reason,
                            message=message)


# Everything comes from the console itself; no frame, no form posting elsewhere, no Referer.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; "
                               "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def console_app(*, backend: Backend, live: LiveRuns) -> web.Application:
    app = web.Application(middlewares=[error_pages, auth.authenticate])
    app[views.BACKEND] = backend
    app[views.LIVE] = live
    app[views.TEMPLATES] = views.environment(str(HERE / "templates"))
    app[views.STREAMS] = views.Streams()
    app[auth.SESSIONS_KEY] = auth.Sessions()
    app[auth.ACCESS_KEY] = backend.access
    add_api_routes(app, config=backend.config, store=backend.store, access=backend.access,
                   lookups=backend.lookups)
    views.add_routes(app)
    app.router.add_static("/static", HERE / "static", name="static")

    async def end_streams(app: web.Application) -> None:
        for task in list(app[views.STREAMS].tasks):
            task.cancel()

    app.on_shutdown.append(end_streams)
    app.on_response_prepare.append(_security_headers)
    return app


@asynccontextmanager
async def console(config: Config, *, admin_token: Secret | None = None
                  ) -> AsyncIterator[web.Application]:
    """The console app with its resources open, following the accounts' runs."""
    async with open_backend(config, admin_token=admin_token) as backend:
        live = LiveRuns(backend.account_ids)
        follower = asyncio.create_task(live.follow(backend.broker))
        try:
            yield console_app(backend=backend, live=live)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await follower


@asynccontextmanager
async def serving_console(config: Config, *, host: str = "127.0.0.1", port: int = 0,
                          admin_token: Secret | None = None,
                          ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """Serve the console for the duration of the block; yields its base URL. Refuses
    (``ConfigError``) a non-loopback ``host`` when no token is configured."""
    check_bind(host, ApiAccess(config=config, admin_token=admin_token))
    async with console(config, admin_token=admin_token) as app:
        runner = web.AppRunner(app, access_log_class=AccessLogger, access_log=ACCESS_LOG,
                               shutdown_timeout=5.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
            await site.start()
            sockets = getattr(site._server, "sockets", None)
            bound = sockets[0].getsockname()[1] if sockets else port
            scheme = "https" if ssl_context is not None else "http"
            shown = f"[{host}]" if ":" in host else host
            yield f"{scheme}://{shown}:{bound}"
        finally:
            await runner.cleanup()


def _tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("--tls-cert", "--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("--tls-cert", f"cannot load the certificate and key: {exc}") from None
    return context


async def console_command(*, config: Config, host: str, port: int, token_env: str | None,
                          tls_cert: Path | None = None, tls_key: Path | None = None) -> int:
    """``prefsync console`` (and ``prefsync api``): serve until interrupted."""
    token = None
    if token_env:
        value = os.environ.get(token_env)
        if not value:
            raise ConfigError("--token-env", f"environment variable {token_env} is not set")
        token = Secret(value)
    async with serving_console(config, host=host, port=port, admin_token=token,
                               ssl_context=_tls(tls_cert, tls_key)) as url:
        print(f"prefsync console on {url}/ (JSON API under the same address)", flush=True)
        await asyncio.Future()
    return 0
