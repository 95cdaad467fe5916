"""What a user sees: one email's preferences, its history, an account's status; and the HTTP API.

- ``prefsync prefs ACCOUNT EMAIL [--filter all|opted-in|opted-out|private|public]``: each
  preference of the account's catalog (in dotdigital's order, with its category) and its status
  as the sync holds it (opted in, opted out, or not set), the side that last changed it and
  when; the contact methods of every Dynamics record with that email (bulk email allowed or
  not, from ``donotbulkemail``, read live from Dataverse); and the dotdigital contact status
  the sync last saw.
- ``prefsync history ACCOUNT EMAIL``: every change seen for the email, oldest first, with its
  origin side and time and the decision (applied, stale, echo, tie, suppressed, ineligible),
  and every write (written, failed, suppressed).
- the same as JSON over HTTP, read-only, served by ``prefsync console`` (and its alias
  ``prefsync api``, :mod:`services.cli.console`):

  ``GET /accounts/{account}/status``,
  ``GET /accounts/{account}/contacts/{email}/preferences?filter=...``,
  ``GET /accounts/{account}/contacts/{email}/history``.

  Only accounts in the config exist; every answer is about the one account in the path. Who
  may ask for which account, and how live lookups are limited: ``services.cli.api``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Literal, TextIO

import orjson
from aiohttp import web

from common.config import Config, Secret
from common.domain import HistoryEntry, KeyState, normalize_email
from common.store import LedgerStore, open_store
from common.vendors.dataverse.catalog import CatalogEntry, entries_of_tree, load_tree
from common.vendors.dataverse.client import DataverseClient
from services.cli.api import (
    ApiAccess,
    Caller,
    LiveLookups,
    LookupLimited,
    api_share,
    contact_methods,
)
from services.runtime.status import account_status, format_status

__all__ = ["add_api_routes", "api_app", "api_resources", "contact_methods", "history_view",
           "preferences_view"]

Filter = Literal["all", "opted-in", "opted-out", "private", "public"]
FILTERS: tuple[Filter, ...] = ("all", "opted-in", "opted-out", "private", "public")
DECISIONS = {
    "applied": "applied", "stale": "stale (an older change)", "echo": "echo (our own write)",
    "duplicate": "duplicate", "tie_opt_out_won": "tie: the opt-out won",
    "tie_opt_in_lost": "tie: the opt-in lost", "tie_same_value": "tie: same value",
    "joined": "a record took this email (it gets the email's value)",
    "suppressed": "suppressed contact: not synced", "ineligible": "ineligible: not synced",
    "written": "written by prefsync", "failed": "write failed",
    "read-only": "record read-only (inactive or qualified): not written to it",
    "no-record": "record deleted: not written to it",
    "future_timestamp": "stamped beyond the future bound: taken as made when read",
}


def _iso(value: Any) -> str | None:
    return None if value is None else str(value.isoformat())


def _preference_views(entries: Sequence[CatalogEntry],
                      states: Mapping[int, KeyState]) -> list[dict[str, Any]]:
    categories = {e.preference_id: e for e in entries if e.is_category}
    listed = {e.preference_id for e in entries}
    out: list[dict[str, Any]] = []
    for entry in entries:
        if entry.is_category:
            continue
        out.append(_preference_view(entry, categories.get(entry.category_id),
                                    states.get(entry.preference_id)))
    # preferences the ledger knows but the catalog no longer lists (deleted in dotdigital)
    for preference_id in sorted(set(states) - listed):
        gone = CatalogEntry(preference_id=preference_id, category_id=0,
                            name=f"(deleted preference {preference_id})",
                            public_name="", is_public=False, is_category=False, order=0)
        out.append(_preference_view(gone, None, states[preference_id]))
    return out


def _preference_view(entry: CatalogEntry, category: CatalogEntry | None,
                     state: KeyState | None) -> dict[str, Any]:
    register = state.register if state is not None else None
    status = "not set" if register is None else "opted in" if register.opted_in else "opted out"
    return {
        "id": entry.preference_id,
        "name": entry.name,
        "public_name": entry.public_name,
        "category": None if category is None else {"id": category.preference_id,
                                                    "name": category.name},
        "public": entry.is_public,
        "status": status,
        "changed_by": register.origin_side if register else None,
        "changed_at": _iso(register.origin_time) if register else None,
    }


def _matches(view: Mapping[str, Any], wanted: Filter) -> bool:
    status, public = str(view["status"]), bool(view["public"])
    return {"all": True, "opted-in": status == "opted in", "opted-out": status == "opted out",
            "private": not public, "public": public}[wanted]


Lookup = Callable[[str], Awaitable[list[dict[str, Any]] | None]]


async def preferences_view(store: LedgerStore, *, account: str, email: str,
                           dataverse: DataverseClient | None = None,
                           wanted: Filter = "all", lookup: Lookup | None = None
                           ) -> dict[str, Any]:
    """One email's preferences as the sync holds them (``ValueError`` for a bad email). The
    contact methods come from ``lookup`` (email -> methods) if given, else live from
    ``dataverse``; None: not shown."""
    if wanted not in FILTERS:
        raise ValueError(f"filter must be one of {', '.join(FILTERS)}")
    email = normalize_email(email)
    entries = entries_of_tree(await load_tree(store, account))
    states = {s.key.preference_id: s for s in await store.states_for_email(account, email)}
    contact = (await store.load_contacts(account, [email])).get(email)
    records = (await store.records_for_emails(account, [email])).get(email, [])
    if lookup is not None:
        methods = await lookup(email)
    else:
        methods = await contact_methods(dataverse, email=email) if dataverse is not None \
            else None
    eligible = {r.record_id for r in records}
    for method in methods or []:
        method["eligible"] = method["record_id"] in eligible
    views = [v for v in _preference_views(entries, states) if _matches(v, wanted)]
    return {
        "account": account,
        "email": email,
        "filter": wanted,
        "eligible": bool(records),
        "dotdigital_contact": None if contact is None else {
            "status": contact.status, "suppressed": contact.suppressed,
            "since": _iso(contact.since)},
        "contact_methods": methods,
        "preferences": views,
    }


def _history_view(entry: HistoryEntry, names: Mapping[int, str]) -> dict[str, Any]:
    return {
        "recorded_at": _iso(entry.recorded_at),
        "preference_id": entry.preference_id,
        "preference": names.get(entry.preference_id, f"preference {entry.preference_id}"),
        "side": entry.side,
        "opted_in": entry.opted_in,
        "origin_time": _iso(entry.origin_time),
        "corrected_time": _iso(entry.corrected_time),
        "decision": entry.decision,
        "change_id": entry.change_id,
    }


async def history_view(store: LedgerStore, *, account: str, email: str) -> dict[str, Any]:
    """Every decision and write recorded for one email, oldest first."""
    email = normalize_email(email)
    names = {e.preference_id: e.name for e in entries_of_tree(await load_tree(store, account))}
    entries = await store.history(account, email)
    return {"account": account, "email": email,
            "history": [_history_view(e, names) for e in entries]}


# --- text output ------------------------------------------------------------------------------
def format_preferences(view: Mapping[str, Any]) -> str:
    lines = [f"{view['email']} in {view['account']}"
             + ("" if view["eligible"] else " (no eligible Dynamics record: not synced)")]
    contact = view["dotdigital_contact"]
    lines.append("  dotdigital contact: " + (
        "not seen by the sync yet" if contact is None else
        f"{contact['status']}{' (suppressed: not synced)' if contact['suppressed'] else ''}"))
    if view["contact_methods"] is not None:
        for m in view["contact_methods"]:
            lines.append(f"  Dynamics {m['record_type']} {m['record_id']}: bulk email "
                         f"{m['bulk_email']}, email {m['email']}"
                         f"{'' if m.get('eligible') else ' (not in an email-activated list)'}"
                         f"{'' if m['active'] else ' (inactive)'}")
    lines.append(f"  preferences ({view['filter']}):")
    for p in view["preferences"]:
        where = f"{p['category']['name']} > " if p["category"] else ""
        changed = (f", last changed in {p['changed_by']} at {p['changed_at']}"
                   if p["changed_by"] else "")
        lines.append(f"    {where}{p['name']} [{'public' if p['public'] else 'private'}]: "
                     f"{p['status']}{changed}")
    if not view["preferences"]:
        lines.append("    (none)")
    return "\n".join(lines)


def format_history(view: Mapping[str, Any]) -> str:
    lines = [f"history of {view['email']} in {view['account']}"]
    for h in view["history"]:
        value = "opted in" if h["opted_in"] else "opted out"
        decision = DECISIONS.get(h["decision"], h["decision"])
        corrected = h.get("corrected_time")
        ours = (f", {corrected} by our clock"
                if corrected and corrected != h["origin_time"] else "")
        lines.append(f"  {h['recorded_at']}  {h['preference']}: {value} from {h['side']} "
                     f"(changed {h['origin_time']}{ours}) -> {decision}")
    if not view["history"]:
        lines.append("  (nothing recorded)")
    return "\n".join(lines)


# --- commands ---------------------------------------------------------------------------------
def _email_argument(email: str) -> str:
    """The normalised address, or "" (and the problem printed) when it is not one."""
    try:
        return normalize_email(email)
    except ValueError as exc:
        print(f"prefsync: {email!r}: {exc}", file=sys.stderr)
        return ""


async def show_preferences(*, config: Config, account: str, email: str, wanted: Filter,
                           as_json: bool, out: TextIO = sys.stdout) -> int:
    account_config = config.account(account)
    if (email := _email_argument(email)) == "":
        return 2
    async with open_store(config.store.url) as store, \
            DataverseClient(config=account_config.dynamics) as dataverse:
        view = await preferences_view(store, account=account, email=email,
                                      dataverse=dataverse, wanted=wanted)
    print(_dump(view) if as_json else format_preferences(view), file=out)
    return 0


async def show_history(*, config: Config, account: str, email: str, as_json: bool,
                       out: TextIO = sys.stdout) -> int:
    config.account(account)
    if (email := _email_argument(email)) == "":
        return 2
    async with open_store(config.store.url) as store:
        view = await history_view(store, account=account, email=email)
    print(_dump(view) if as_json else format_history(view), file=out)
    return 0


async def show_status(*, config: Config, account: str | None, as_json: bool,
                      out: TextIO = sys.stdout) -> int:
    accounts = [config.account(account)] if account else list(config.accounts)
    async with open_store(config.store.url) as store:
        statuses = [await account_status(store, account=a.id, schedule=a.schedule)
                    for a in accounts]
    if as_json:
        print(_dump(statuses if account is None else statuses[0]), file=out)
    else:
        print("\n".join(format_status(s) for s in statuses), file=out)
    return 0


def _dump(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


# --- the HTTP API -----------------------------------------------------------------------------
def _json(value: Any, *, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")


ACCOUNT_KEY = web.AppKey("config", Config)
STORE_KEY = web.AppKey("store", LedgerStore)
ACCESS_KEY = web.AppKey("access", ApiAccess)
LOOKUPS_KEY = web.AppKey("lookups", LiveLookups)
CALLER = web.RequestKey("caller", Caller)


def _error(error: type[web.HTTPError], message: str, **kwargs: Any) -> web.HTTPError:
    return error(text=orjson.dumps({"error": message}).decode(),
                 content_type="application/json", **kwargs)


@web.middleware
async def _authorise(request: web.Request,
                     handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    caller = request.app[ACCESS_KEY].caller(request.headers.get("Authorization", ""))
    if caller is None:
        return _json({"error": "a valid bearer token is required"}, status=401)
    request[CALLER] = caller
    response: web.StreamResponse = await handler(request)
    return response


def _account(request: web.Request) -> str:
    """The path's account, if it exists and the caller may read it; else 404, the same for
    both, so that a token does not tell which other accounts exist."""
    account = request.match_info["account"]
    exists = any(a.id == account for a in request.app[ACCOUNT_KEY].accounts)
    if not exists or not request[CALLER].may_read(account):
        raise _error(web.HTTPNotFound, f"no account {account!r}")
    return account


def _bad_request(message: str) -> web.HTTPError:
    return _error(web.HTTPBadRequest, message)


async def _status(request: web.Request) -> web.Response:
    account = _account(request)
    schedule = request.app[ACCOUNT_KEY].account(account).schedule
    return _json(await account_status(request.app[STORE_KEY], account=account,
                                      schedule=schedule))


async def _preferences(request: web.Request) -> web.Response:
    account = _account(request)
    wanted = request.query.get("filter", "all")
    if wanted not in FILTERS:
        raise _bad_request(f"filter must be one of {', '.join(FILTERS)}")
    lookups, caller = request.app[LOOKUPS_KEY], request[CALLER]

    async def lookup(email: str) -> list[dict[str, Any]] | None:
        return await lookups.contact_methods(caller, account=account, email=email)

    try:
        view = await preferences_view(request.app[STORE_KEY], account=account,
                                      email=request.match_info["email"], wanted=wanted,
                                      lookup=lookup)
    except ValueError as exc:
        raise _bad_request(str(exc)) from None
    except LookupLimited as exc:
        raise _error(web.HTTPTooManyRequests, str(exc),
                     headers={"Retry-After": str(int(exc.retry_after_s))}) from None
    return _json(view)


async def _history(request: web.Request) -> web.Response:
    account = _account(request)
    try:
        view = await history_view(request.app[STORE_KEY], account=account,
                                  email=request.match_info["email"])
    except ValueError as exc:
        raise _bad_request(str(exc)) from None
    return _json(view)


def add_api_routes(app: web.Application, *, config: Config, store: LedgerStore, access: ApiAccess,
                   lookups: LiveLookups) -> None:
    """The read-only JSON routes on ``app``, whose middleware puts the caller in
    ``request[CALLER]`` (the console serves them beside its pages)."""
    app[ACCOUNT_KEY] = config
    app[STORE_KEY] = store
    app[ACCESS_KEY] = access
    app[LOOKUPS_KEY] = lookups
    app.router.add_get("/accounts/{account}/status", _status, name="api-status")
    app.router.add_get("/accounts/{account}/contacts/{email}/preferences", _preferences,
                       name="api-preferences")
    app.router.add_get("/accounts/{account}/contacts/{email}/history", _history,
                       name="api-history")


def api_app(*, config: Config, store: LedgerStore, dataverse: Mapping[str, DataverseClient],
            token: Secret | None = None, lookups: LiveLookups | None = None
            ) -> web.Application:
    """The read-only API over an open store and one Dataverse client per account. ``token`` is
    the admin token (every account); without it, ``[api] admin_token_*`` of the config. Account
    tokens come from the config (``services.cli.api``)."""
    app = web.Application(middlewares=[_authorise])
    add_api_routes(app, config=config, store=store,
                   access=ApiAccess(config=config, admin_token=token),
                   lookups=lookups or LiveLookups(clients=dict(dataverse),
                                                  per_minute=config.api.lookups_per_minute))
    return app


@asynccontextmanager
async def api_resources(config: Config) -> AsyncIterator[tuple[Any, dict[str, DataverseClient]]]:
    """The store and a Dataverse client per account, open for the API's lifetime; the clients
    are paced to the API's slice of each account's budget (``api_share``)."""
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_store(config.store.url))
        clients = {a.id: await stack.enter_async_context(
                       DataverseClient(config=api_share(a.dynamics)))
                   for a in config.accounts}
        yield store, clients
