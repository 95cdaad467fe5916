"""The aiohttp application: API-family tagging, shared ``/_sim/`` machinery, auth, limits."""

from __future__ import annotations

import logging

from aiohttp import web

from services.simulators.base import Handler, Setting
from services.simulators.dotdigital import simroutes, v2, v3
from services.simulators.dotdigital.backend import Backend
from services.simulators.dotdigital.errors import (
    ApiFamily,
    V2Error,
    V3Error,
    current_family,
    rate_limit_headers,
    throttled_response,
    unauthorized,
)
from services.simulators.dotdigital.limits import SCOPE
from services.simulators.dotdigital.transport import BACKEND, current_user

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 50 * 1024 * 1024  # the v3 import's documented limit


def family_of(path: str) -> ApiFamily | None:
    if path.startswith("/v2/"):
        return "v2"
    if path == "/contacts/v3" or path.startswith("/contacts/v3/"):
        return "v3"
    return None


@web.middleware
async def _tag_family(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: remembers which API a request is for, so every error takes its shape."""
    family = family_of(request.path)
    token = current_family.set(family or "v2")
    try:
        return await handler(request)
    finally:
        current_family.reset(token)


def _routing_error(request: web.Request, exc: web.HTTPException, family: ApiFamily
                   ) -> web.Response:
    if family == "v3":
        codes = {404: "contacts:resourceNotFound", 405: "contacts:methodNotAllowed",
                 413: "contacts:requestTooLarge"}
        return V3Error(exc.status, codes.get(exc.status, "contacts:badRequest"),
                       exc.reason).response()
    if exc.status == 404:
        text = f"No HTTP resource was found that matches the request URI '{request.url}'."
    elif exc.status == 405:
        text = f"The requested resource does not support http method '{request.method}'."
    else:
        text = exc.reason
    return V2Error(exc.status, text).response()


@web.middleware
async def _api(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Innermost for API paths: Basic auth, the account's call-rate limit, vendor errors."""
    family = family_of(request.path)
    if family is None:
        return await handler(request)
    backend = request.app[BACKEND]
    user = backend.credentials.check(request.headers.get("Authorization"))
    if user is None:
        return unauthorized()
    token = current_user.set(user)
    try:
        verdict = backend.limits.spend(user.account_id)
        headers = {} if verdict is None else rate_limit_headers(
            limit=verdict.limit, remaining=verdict.remaining, reset_s=verdict.reset_s,
            scope=SCOPE)
        if verdict is not None and not verdict.allowed:
            return throttled_response(headers)
        response: web.StreamResponse
        try:
            response = await handler(request)
        except (V2Error, V3Error) as exc:
            response = exc.response()
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed,
                web.HTTPRequestEntityTooLarge) as exc:
            response = _routing_error(request, exc, family)
        response.headers.update(headers)
        return response
    finally:
        current_user.reset(token)


def build_app(backend: Backend) -> web.Application:
    app = web.Application(middlewares=[_tag_family], client_max_size=MAX_BODY_BYTES)
    app[BACKEND] = backend
    backend.control.install(app, Setting(name="limits", describe=backend.limits.describe,
                                         load=backend.limits.load))
    app.middlewares.append(_api)
    for module in (simroutes, v2, v3):
        app.add_routes(module.routes)

    async def on_cleanup(_: web.Application) -> None:
        backend.imports.run_pending()  # accepted imports are applied, as the service would
        backend.imports.clear()
        saved = backend.save()
        if saved is not None:
            log.info("dotdigital simulator: state saved to %s", saved)

    app.on_cleanup.append(on_cleanup)
    return app
