"""dotdigital-only ``/_sim/`` routes (no authentication; not part of dotdigital's API)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from services.simulators.base import json_object, json_response
from services.simulators.dotdigital.backend import Backend
from services.simulators.dotdigital.model import V2_STATUSES, Contact, enum_value
from services.simulators.dotdigital.store import AccountStore, UnknownPreference
from services.simulators.dotdigital.transport import backend_of
from services.simulators.dotdigital.v2 import api_contact, api_opt_in

# each route is declared on its handler (``limits`` and ``save`` are set up by the app)
routes = web.RouteTableDef()


def _bad(text: str) -> web.Response:
    return json_response({"error": text}, status=400)


@dataclass(frozen=True)
class _Edit:
    """An edit as the contact would make it, checked: nothing is changed yet."""

    store: AccountStore
    contact: Contact
    status: str | None
    changes: list[tuple[int, bool]]
    ago_s: float


def _edit_of(backend: Backend, body: Any) -> _Edit:
    """Checks an edit's body; raises ValueError (or KeyError, UnknownPreference) saying what is
    wrong with it."""
    if not isinstance(body, dict):
        raise ValueError("an edit is a JSON object")
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
    return _Edit(store=store, contact=contact, status=status, changes=changes, ago_s=ago)


def _apply(backend: Backend, edit: _Edit) -> None:
    # a change committed earlier that becomes visible only now (stamped in the past)
    now = backend.now_ms() - round(edit.ago_s * 1000)
    if edit.status is not None:
        edit.store.set_status(edit.contact, edit.status, now_ms=now)
    if edit.changes:
        edit.store.set_preferences(edit.contact, edit.changes, now_ms=now, as_contact=True)


@routes.post("/_sim/dotdigital/edit")
async def edit_contact(request: web.Request) -> web.Response:
    """Acts as the contact would in a preference centre: sets preferences and/or status."""
    backend = backend_of(request)
    try:
        edit = _edit_of(backend, await json_object(request))
    except (ValueError, KeyError, UnknownPreference) as exc:
        return _bad(str(exc))
    _apply(backend, edit)
    store, contact = edit.store, edit.contact
    return json_response({"contact": api_contact(contact),
                          "marketingPreferenceOptIns": [
                              api_opt_in(store, r) for r in store.opt_ins(contact)]})


@routes.post("/_sim/dotdigital/edits")
async def edit_contacts(request: web.Request) -> web.Response:
    """Several contacts' edits (``{"edits": [<an /edit body>, ...]}``) in one request: each is
    applied in order, as that many ``/edit`` requests would be; one that is refused answers
    its error in its place in ``results`` and the others still apply. For a load of many
    people's edits, without a request's cost each."""
    backend = backend_of(request)
    try:
        edits = (await json_object(request)).get("edits")
        if not isinstance(edits, list):
            raise ValueError('the body must look like {"edits": [...]}')
    except ValueError as exc:
        return _bad(str(exc))
    results: list[dict[str, Any]] = []
    for body in edits:
        try:
            edit = _edit_of(backend, body)
        except (ValueError, KeyError, UnknownPreference) as exc:
            results.append({"error": str(exc)})
            continue
        _apply(backend, edit)
        results.append({"id": edit.contact.id})
    return json_response({"results": results})


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
