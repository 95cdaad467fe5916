"""Request plumbing shared by the v2, v3 and ``/_sim/`` handlers."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from services.simulators.dotdigital.accounts import ApiUser
from services.simulators.dotdigital.store import AccountStore

if TYPE_CHECKING:
    from services.simulators.dotdigital.backend import Backend

BACKEND: web.AppKey[Backend] = web.AppKey("dotdigital_backend")
# The API user the current request authenticated as (set by the auth middleware; each request
# runs in its own task, so this is per request).
current_user: ContextVar[ApiUser] = ContextVar("dotdigital_api_user")


def backend_of(request: web.Request) -> Backend:
    return request.app[BACKEND]


def user_of(request: web.Request) -> ApiUser:
    return current_user.get()


def store_of(request: web.Request) -> AccountStore:
    """The data of the account the caller's API user belongs to, and no other."""
    return backend_of(request).stores[user_of(request).account_id]


class BadBody(Exception):
    """The body is not JSON."""


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadBody(str(exc)) from exc


def lower_keys(value: Any) -> Any:
    """v2 binds request keys case-insensitively: fold every object key to lower case."""
    if isinstance(value, dict):
        return {str(k).lower(): lower_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [lower_keys(v) for v in value]
    return value


def query_value(request: web.Request, name: str) -> str | None:
    """A query parameter matched case-insensitively (``minContactId`` = ``minContactID``)."""
    wanted = name.lower()
    for key, value in request.query.items():
        if key.lower() == wanted:
            return value
    return None


def base_url(request: web.Request) -> str:
    """The simulator's base URL as this request reached it."""
    return f"{request.scheme}://{request.host}"
