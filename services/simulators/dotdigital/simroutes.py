"""dotdigital-only ``/_sim/`` routes (no authentication; not part of dotdigital's API)."""

from __future__ import annotations

from aiohttp import web

from services.simulators.base import json_object, json_response
from services.simulators.dotdigital.model import V2_STATUSES, enum_value
from services.simulators.dotdigital.store import UnknownPreference
from services.simulators.dotdigital.transport import backend_of
from services.simulators.dotdigital.v2 import api_contact, api_opt_in

# each route is declared on its handler (``limits`` and ``save`` are set up by the app)
routes = web.RouteTableDef()


def _bad(text: str) -> web.Response:
    return json_response({"error": text}, status=400)


@routes.post("/_sim/dotdigital/edit")
async def edit_contact(request: web.Request) -> web.Response:
    """Acts as the contact would in a preference centre: sets preferences and/or status."""
    backend = backend_of(request)
    try:
        body = await json_object(request)
        store = backend.stores[backend.account_from(body.get("account"))]
        email = body.get("email")
        contact = store.by_email(email) if isinstance(email, str) else None
        if contact is None:
            raise ValueError(f"no contact {email!r} in this account")
        status = None
        if "status" in body:
            status = enum_value(body["status"], V2_STATUSES)
            if status is None or status == "Deleted":
                raise ValueError(f"status must be one of {', '.join(V2_STATUSES[:-1])}")
        raw_prefs = body.get("preferences") or {}
        if not isinstance(raw_prefs, dict) or not all(
                isinstance(v, bool) for v in raw_prefs.values()):
            raise ValueError('preferences must look like {"<id>": true|false}')
        changes = [(int(k), v) for k, v in raw_prefs.items()]
        store.check_preferences(changes)
        ago = body.get("stamped_ago_s", 0)
        if not isinstance(ago, int | float) or isinstance(ago, bool) or not 0 <= ago <= 86400:
            raise ValueError("stamped_ago_s must be a number of seconds from 0 to 86400")
    except (ValueError, KeyError, UnknownPreference) as exc:
        return _bad(str(exc))
    # a change committed earlier that becomes visible only now (stamped in the past)
    now = backend.now_ms() - round(ago * 1000)
    if status is not None:
        store.set_status(contact, status, now_ms=now)
    if changes:
        store.set_preferences(contact, changes, now_ms=now, as_contact=True)
    return json_response({"contact": api_contact(contact),
                          "marketingPreferenceOptIns": [
                              api_opt_in(store, r) for r in store.opt_ins(contact)]})


@routes.post("/_sim/dotdigital/imports/run")
async def run_imports(request: web.Request) -> web.Response:
    return json_response({"finished": backend_of(request).imports.run_pending()})


@routes.get("/_sim/dotdigital/accounts")
async def list_accounts(request: web.Request) -> web.Response:
    backend = backend_of(request)
    users: dict[int, list[str]] = {}
    for user in backend.credentials.users():
        users.setdefault(user.account_id, []).append(user.username)
    return json_response([{"id": aid, "api_users": users.get(aid, []),
                           "contacts": len(store.contacts),
                           "preferences": len(store.preferences.leaves()),
                           "states": store.states_set(),
                           "first_contact_id": store.first_contact_id}
                          for aid, store in backend.stores.items()])
