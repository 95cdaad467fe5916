"""The v2 API: account, server time, preference tree, contacts, opt-ins, suppressions, lists.

Request keys bind case-insensitively; responses are camelCase. Errors are
``{"message": "... ERROR_*"}``. Choices where dotdigital documents nothing (inferred):

- Not-found errors answer 404; validation and suppression refusals 400.
- ``PUT .../preferences`` is a partial update: only listed preferences change. It answers
  ``{"value": ""}``. A category item must list its preferences (a category has no state).
- ``opt-ins-since`` and ``with-preference`` return contacts with ``id >= minContactId`` in id
  order, at most 1000; the date is inclusive. Opt-outs are included in ``opt-ins-since``.
- ``GET /v2/contacts/{id}`` by id does not return suppressed contacts (as dotdigital documents);
  by email it does.
- ``POST /v2/contacts/unsubscribe`` for an unknown email adds it as an unsubscribed contact.
- ``resubscribe``: an unsubscribed contact is challenged (``ContactChallenged``, status
  ``PendingOptIn``); ``resubscribe-with-no-challenge`` subscribes it (``ContactAdded``). Other
  suppressions answer ``ContactCannotBeUnsuppressed``. An unknown email is added subscribed.
- ``addressBookId`` on an opt-in is the contact's first list (0 when in none).
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from services.simulators.base import json_body_response, json_response
from services.simulators.dotdigital.dates import format_ms, parse_path_date
from services.simulators.dotdigital.errors import (
    V2Error,
    contact_not_found,
    contact_suppressed,
    invalid_parameter,
    preference_invalid,
    preference_not_found,
)
from services.simulators.dotdigital.model import (
    ACTIVE_STATUSES,
    API_RESUBSCRIBABLE,
    EMAIL_TYPES,
    OPT_IN_TYPES,
    Contact,
    enum_value,
    valid_email,
)
from services.simulators.dotdigital.preferences import parse_preference_input
from services.simulators.dotdigital.store import (
    AccountStore,
    ContactSuppressed,
    OptInRecord,
    UnknownPreference,
)
from services.simulators.dotdigital.transport import (
    BadBody,
    backend_of,
    base_url,
    lower_keys,
    query_value,
    read_json,
    store_of,
    user_of,
)

PAGE_LIMIT = 1000
RESERVED_BOOK_NAMES = ("test", "all contacts")

# each route is declared on its handler
routes = web.RouteTableDef()


# --- rendering -------------------------------------------------------------------------------

def _shown(contact: Contact) -> tuple[int, str, str, str, str]:
    """What a contact's v2 rendering shows of it (its data fields aside): an opt-ins page keeps
    a contact's part rendered while these stand."""
    return contact.id, contact.email, contact.opt_in_type, contact.email_type, contact.status


def api_contact(contact: Contact, *, full: bool = False) -> dict[str, Any]:
    contact_id, email, opt_in_type, email_type, status = _shown(contact)
    return {
        "id": contact_id, "email": email, "optInType": opt_in_type,
        "emailType": email_type,
        "dataFields": ([{"key": k, "value": v} for k, v in contact.data_fields.items()]
                       if full else None),
        "status": status,
    }


def _opt_in(preference_id: int, address_book_id: int, opted_in: bool,
            date_modified: str) -> dict[str, Any]:
    return {"marketingPreferenceId": preference_id, "addressBookId": address_book_id,
            "isOptedIn": opted_in, "dateModifed": date_modified}


def api_opt_in(store: AccountStore, record: OptInRecord) -> dict[str, Any]:
    return _opt_in(record.preference_id, store.address_book_of(record.contact),
                   record.opted_in, format_ms(record.modified_ms))


# Per store, each contact's part of an opt-ins page as last rendered, by slot: (what it showed,
# the bytes up to its opt-in record). The feed's readers read the same contacts again and
# again (each run's overlap, the writer's read before each round).
_RENDERED: weakref.WeakKeyDictionary[AccountStore, dict[int, tuple[tuple[Any, ...], bytes]]] = (
    weakref.WeakKeyDictionary())


def opt_in_changes_body(store: AccountStore, preference_id: int, slots: list[int]) -> bytes:
    """An ``opt-ins-since`` page as JSON (what ``orjson`` makes of each contact with its one
    opt-in record, as ``api_contact`` and ``api_opt_in`` render them), read straight from the
    preference's states. A contact's part is rendered again only when what it shows changed
    (:func:`_shown`); an opt-in record's once a page for each list, value and stamp (an import
    stamps its contacts alike)."""
    states = store.states[preference_id]
    opted, modified = states.opted.values(), states.modified.values()
    contacts = store.contacts
    book_of = store.address_book_of
    rendered = _RENDERED.get(store)
    if rendered is None:
        rendered = _RENDERED[store] = {}
    records: dict[tuple[int, bool, int], bytes] = {}
    parts: list[bytes] = []
    for slot in slots:
        contact = contacts[slot]
        shown = _shown(contact)
        part = rendered.get(slot)
        if part is None or part[0] != shown:
            part = rendered[slot] = (shown, b'{"contact":' + orjson.dumps(api_contact(contact))
                                     + b',"marketingPreferenceOptIns":[')
        key = (book_of(contact), opted[slot] == 1, modified[slot])
        record = records.get(key)
        if record is None:
            record = records[key] = orjson.dumps(
                _opt_in(preference_id, key[0], key[1], format_ms(key[2]))) + b"]}"
        parts.append(part[1] + record)
    return b"[" + b",".join(parts) + b"]"


def api_suppression(contact: Contact) -> dict[str, Any]:
    return {"suppressedContact": api_contact(contact),
            "dateRemoved": format_ms(contact.date_removed_ms or 0), "reason": contact.status}


# --- request helpers -------------------------------------------------------------------------

async def _body(request: web.Request) -> Any:
    try:
        return lower_keys(await read_json(request))
    except BadBody:
        raise invalid_parameter("The request body is not valid JSON.") from None


def _date(request: web.Request, name: str = "date") -> int:
    text = request.match_info[name]
    parsed = parse_path_date(text)
    if parsed is None:
        raise invalid_parameter(f"'{text}' is not a valid date.")
    return parsed


def _int_query(request: web.Request, name: str, default: int) -> int:
    raw = query_value(request, name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise invalid_parameter(f"{name} must be an integer.") from None


def _paging(request: web.Request) -> tuple[int, int]:
    select = _int_query(request, "select", PAGE_LIMIT)
    skip = _int_query(request, "skip", 0)
    if not 1 <= select <= PAGE_LIMIT or skip < 0:
        raise invalid_parameter(
            f"select must be between 1 and {PAGE_LIMIT} and skip must not be negative.")
    return select, skip


def _path_int(request: web.Request, name: str) -> int:
    text = request.match_info[name]
    if not (text.isascii() and text.lstrip("-").isdigit()):
        raise invalid_parameter(f"'{text}' is not a valid {name}.")
    return int(text)


def _contact(request: web.Request, name: str = "id_or_email") -> Contact:
    contact = store_of(request).find(request.match_info[name])
    if contact is None:
        raise contact_not_found()
    return contact


def _leaf_id(request: web.Request, store: AccountStore) -> int:
    preference_id = _path_int(request, "preference_id")
    try:
        store.leaf(preference_id)
    except UnknownPreference as exc:
        if exc.is_category:
            raise preference_invalid(f"{preference_id} is a preference category.") from None
        raise preference_not_found(preference_id) from None
    return preference_id


def _email_field(body: Any, key: str = "email") -> str:
    email = body.get(key) if isinstance(body, dict) else None
    if not isinstance(email, str) or not valid_email(email):
        raise invalid_parameter("Email is not a valid email address.")
    return email


def _data_fields(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, list) or not all(
            isinstance(x, dict) and isinstance(x.get("key"), str) for x in raw):
        raise invalid_parameter("dataFields must be a list of {key, value}.")
    return {x["key"].upper(): x.get("value") for x in raw}


# --- account ---------------------------------------------------------------------------------

@routes.get("/v2/account-info")
async def account_info(request: web.Request) -> web.Response:
    account_id = user_of(request).account_id
    props = [("Name", f"Account {account_id}"),
             ("MainEmail", f"owner@account-{account_id}.example.com"),
             ("APILocale", "en-GB"),
             ("ApiEndpoint", base_url(request))]
    return json_response({"id": account_id, "properties": [
        {"name": name, "type": "String", "value": value} for name, value in props]})


@routes.get("/v2/server-time")
async def server_time(request: web.Request) -> web.Response:
    return json_response(format_ms(backend_of(request).now_ms()))


# --- preference tree -------------------------------------------------------------------------

@routes.get("/v2/preferences")
async def get_preferences(request: web.Request) -> web.Response:
    return json_response(store_of(request).preferences.render_tree())


@routes.get("/v2/preferences/modified-since/{date}")
async def get_preferences_modified_since(request: web.Request) -> web.Response:
    since = _date(request)
    return json_response(store_of(request).preferences.render_tree(modified_since_ms=since))


@routes.get("/v2/preferences/{preference_id}")
async def get_preference(request: web.Request) -> web.Response:
    store = store_of(request)
    preference_id = _path_int(request, "preference_id")
    node = store.preferences.get(preference_id)
    if node is None:
        raise preference_not_found(preference_id)
    return json_response(store.preferences.render(node))


@routes.post("/v2/preferences")
async def create_preference(request: web.Request) -> web.Response:
    body = await _body(request)
    if not isinstance(body, dict):
        raise invalid_parameter("The request body must be a preference object.")
    store = store_of(request)
    backend = backend_of(request)
    node = store.preferences.create(parse_preference_input(body), now_ms=backend.now_ms())
    if node.is_preference:
        store.add_preference_states(node.id)
    backend.wrote()
    return json_response(store.preferences.render(node))


@routes.put("/v2/preferences/{preference_id}")
async def update_preference(request: web.Request) -> web.Response:
    preference_id = _path_int(request, "preference_id")
    body = await _body(request)
    if not isinstance(body, dict):
        raise invalid_parameter("The request body must be a preference object.")
    store = store_of(request)
    current = store.preferences.get(preference_id)
    if current is None:
        raise preference_not_found(preference_id)
    body_id = body.get("id")
    if body_id is not None and body_id != preference_id:
        raise invalid_parameter("The id in the body does not match the id in the path.")
    backend = backend_of(request)
    node = store.preferences.update(preference_id,
                                    parse_preference_input(body, current=current),
                                    now_ms=backend.now_ms())
    backend.wrote()
    return json_response(store.preferences.render(node))


@routes.delete("/v2/preferences/{preference_id}")
async def delete_preference(request: web.Request) -> web.Response:
    preference_id = _path_int(request, "preference_id")
    store = store_of(request)
    store.drop_preference_states(store.preferences.delete(preference_id))
    backend_of(request).wrote()
    return web.Response(text="Preference or category (and preferences) were deleted successfully",
                        content_type="text/plain")


# --- a contact's preferences -----------------------------------------------------------------

@routes.get("/v2/contacts/{id_or_email}/preferences")
@routes.get("/v2/contact/{id_or_email}/preferences")
async def get_contact_preferences(request: web.Request) -> web.Response:
    contact = _contact(request)
    store = store_of(request)
    return json_response(store.preferences.render_tree(
        lambda pid: store.opt_in_state(contact, pid)))


def _preference_changes(store: AccountStore, body: Any) -> list[tuple[int, bool]]:
    if not isinstance(body, list):
        raise invalid_parameter("The request body must be an array of preferences.")
    changes: list[tuple[int, bool]] = []

    def visit(item: Any, category: int | None) -> None:
        if not isinstance(item, dict):
            raise invalid_parameter("Each preference must be an object.")
        pid = item.get("id")
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise invalid_parameter("Each preference needs an integer id.")
        node = store.preferences.get(pid)
        if node is None:
            raise preference_not_found(pid)
        is_preference = item.get("ispreference")
        if not isinstance(is_preference, bool):
            raise invalid_parameter(f"isPreference is required for {pid}.")
        if is_preference != node.is_preference:
            kind = "a preference" if node.is_preference else "a preference category"
            raise preference_invalid(f"{pid} is {kind}.")
        if category is not None and node.category_id != category:
            raise preference_invalid(f"Preference {pid} is not in category {category}.")
        if not node.is_preference:
            if category is not None:
                raise preference_invalid("Categories cannot be nested.")
            kids = item.get("preferences")
            if not isinstance(kids, list):
                raise preference_invalid(
                    f"Category {pid} has no opt-in state of its own; list its preferences.")
            for kid in kids:
                visit(kid, pid)
            return
        opted = item.get("isoptedin")
        if not isinstance(opted, bool):
            raise invalid_parameter(f"isOptedIn must be true or false for preference {pid}.")
        changes.append((pid, opted))

    for entry in body:
        visit(entry, None)
    return changes


@routes.put("/v2/contacts/{id_or_email}/preferences")
@routes.put("/v2/contact/{id_or_email}/preferences")
async def put_contact_preferences(request: web.Request) -> web.Response:
    contact = _contact(request)
    store = store_of(request)
    changes = _preference_changes(store, await _body(request))
    backend = backend_of(request)
    try:
        store.set_preferences(contact, changes, now_ms=backend.now_ms())
    except ContactSuppressed:
        raise contact_suppressed() from None
    backend.wrote()
    return json_response({"value": ""})


@routes.get("/v2/contacts/{email}/subscriptions")
async def get_subscriptions(request: web.Request) -> web.Response:
    contact = _contact(request, "email")
    store = store_of(request)
    return json_response({"contact": api_contact(contact),
                          "marketingPreferenceOptIns": [
                              api_opt_in(store, r) for r in store.opt_ins(contact)]})


@routes.get("/v2/contacts/with-preference/{preference_id}/opt-ins-since/{date}")
async def get_opt_ins_since(request: web.Request) -> web.Response:
    store = store_of(request)
    preference_id = _leaf_id(request, store)
    since = _date(request)
    min_id = _int_query(request, "minContactId", 0)
    slots = store.opt_in_changes(preference_id, since_ms=since, min_contact_id=min_id,
                                 limit=PAGE_LIMIT)
    return json_body_response(opt_in_changes_body(store, preference_id, slots))


@routes.get("/v2/contacts/with-preference/{preference_id}")
async def get_with_preference(request: web.Request) -> web.Response:
    store = store_of(request)
    preference_id = _leaf_id(request, store)
    min_id = _int_query(request, "minContactId", 0)
    contacts = store.opted_in_contacts(preference_id, min_contact_id=min_id, limit=PAGE_LIMIT)
    return json_response([{"id": c.id, "email": c.email} for c in contacts])


# --- contacts --------------------------------------------------------------------------------

@routes.get("/v2/contacts/{id_or_email}")
async def get_contact(request: web.Request) -> web.Response:
    key = request.match_info["id_or_email"]
    contact = _contact(request)
    if key.isdigit() and contact.suppressed:
        raise contact_not_found()  # by id, dotdigital does not return suppressed contacts
    return json_response(api_contact(contact, full=True))


def _contact_fields(body: dict[str, Any]) -> tuple[str | None, str | None, dict[str, Any]]:
    opt_in = email_type = None
    if body.get("optintype") is not None:
        opt_in = enum_value(body["optintype"], OPT_IN_TYPES)
        if opt_in is None:
            raise invalid_parameter("optInType is not valid.")
    if body.get("emailtype") is not None:
        email_type = enum_value(body["emailtype"], EMAIL_TYPES)
        if email_type is None:
            raise invalid_parameter("emailType is not valid.")
    return opt_in, email_type, _data_fields(body.get("datafields"))


def _upsert(store: AccountStore, body: Any, now_ms: int) -> tuple[Contact, bool]:
    if not isinstance(body, dict):
        raise invalid_parameter("The request body must be a contact.")
    email = _email_field(body)
    opt_in, email_type, fields = _contact_fields(body)
    contact = store.by_email(email)
    if contact is None:
        return store.create_contact(email=email, now_ms=now_ms, opt_in_type=opt_in or "Unknown",
                                    email_type=email_type or "Html", data_fields=fields), True
    if opt_in:
        contact.opt_in_type = opt_in
    if email_type:
        contact.email_type = email_type
    contact.data_fields.update(fields)
    store.touch(contact, now_ms=now_ms)
    return contact, False


@routes.post("/v2/contacts")
async def post_contact(request: web.Request) -> web.Response:
    backend = backend_of(request)
    contact, created = _upsert(store_of(request), await _body(request), backend.now_ms())
    backend.wrote()
    return json_response(api_contact(contact, full=True), status=201 if created else 200)


# --- suppressions ----------------------------------------------------------------------------

async def _suppressions(request: web.Request, *, unsubscribed_only: bool) -> web.Response:
    since = _date(request)
    select, skip = _paging(request)
    contacts = store_of(request).suppressions_since(since_ms=since, skip=skip, select=select,
                                                    unsubscribed_only=unsubscribed_only)
    return json_response([api_suppression(c) for c in contacts])


routes.get("/v2/contacts/suppressed-since/{date}")(
    partial(_suppressions, unsubscribed_only=False))
routes.get("/v2/contacts/unsubscribed-since/{date}")(
    partial(_suppressions, unsubscribed_only=True))


@routes.post("/v2/contacts/unsubscribe")
async def unsubscribe(request: web.Request) -> web.Response:
    email = _email_field(await _body(request))
    store = store_of(request)
    backend = backend_of(request)
    now = backend.now_ms()
    contact = store.by_email(email)
    if contact is None:
        contact = store.create_contact(email=email, now_ms=now, status="Unsubscribed")
    elif not contact.suppressed:
        store.set_status(contact, "Unsubscribed", now_ms=now)
    backend.wrote()
    return json_response(api_suppression(contact))


async def _resubscribe(request: web.Request, *, challenge: bool) -> web.Response:
    body = await _body(request)
    inner = body.get("unsubscribedcontact") if isinstance(body, dict) else None
    if not isinstance(inner, dict):
        raise invalid_parameter("unsubscribedContact is required.")
    email = _email_field(inner)
    fields = _data_fields(inner.get("datafields"))
    store = store_of(request)
    backend = backend_of(request)
    now = backend.now_ms()
    contact = store.by_email(email)
    if contact is None:
        contact = store.create_contact(email=email, now_ms=now, data_fields=fields)
        outcome = "ContactAdded"
    elif contact.status in ACTIVE_STATUSES or contact.status in API_RESUBSCRIBABLE:
        if challenge and contact.status in ("Unsubscribed", "PendingOptIn"):
            store.set_status(contact, "PendingOptIn", now_ms=now)
            outcome = "ContactChallenged"
        else:
            store.set_status(contact, "Subscribed", now_ms=now)
            outcome = "ContactAdded"
        contact.data_fields.update(fields)
        store.touch(contact, now_ms=now)
    else:
        outcome = "ContactCannotBeUnsuppressed"
    backend.wrote()
    return json_response({"contact": api_contact(contact), "status": outcome})


routes.post("/v2/contacts/resubscribe")(partial(_resubscribe, challenge=True))
routes.post("/v2/contacts/resubscribe-with-no-challenge")(partial(_resubscribe, challenge=False))


@routes.put("/v2/contacts/suppress-contacts")
async def suppress_contacts(request: web.Request) -> web.Response:
    body = await _body(request)
    if not isinstance(body, list) or not all(isinstance(x, dict) for x in body):
        raise invalid_parameter("The request body must be an array of {id} or {email}.")
    store = store_of(request)
    backend = backend_of(request)
    now = backend.now_ms()
    suppressed, not_found = [], []
    for item in body:
        raw_id, raw_email = item.get("id"), item.get("email")
        echo = {"id": raw_id if isinstance(raw_id, int) else 0,
                "email": raw_email if isinstance(raw_email, str) else None}
        contact = None
        if isinstance(raw_id, int) and not isinstance(raw_id, bool) and raw_id > 0:
            contact = store.by_id(raw_id)
        elif isinstance(raw_email, str):
            contact = store.by_email(raw_email)
        if contact is None:
            not_found.append(echo)
            continue
        if not contact.suppressed:
            store.set_status(contact, "Suppressed", now_ms=now)
            backend.wrote()
        suppressed.append(echo)
    return json_response({"suppressed": suppressed, "notFound": not_found})


# --- address books ---------------------------------------------------------------------------

@routes.get("/v2/address-books")
async def list_address_books(request: web.Request) -> web.Response:
    select, skip = _paging(request)
    books = sorted(store_of(request).address_books.values(), key=lambda b: b.id)
    return json_response([{"id": b.id, "name": b.name, "visibility": b.visibility,
                           "contacts": b.contacts} for b in books[skip:skip + select]])


@routes.post("/v2/address-books")
async def create_address_book(request: web.Request) -> web.Response:
    body = await _body(request)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or \
            not body["name"].strip():
        raise invalid_parameter("name is required.")
    name = body["name"].strip()
    visibility = enum_value(body.get("visibility", "Private"), ("Private", "Public"))
    if visibility is None:
        raise invalid_parameter("visibility must be Private or Public.")
    store = store_of(request)
    taken = {b.name.lower() for b in store.address_books.values()}
    if name.lower() in taken or name.lower() in RESERVED_BOOK_NAMES:
        raise V2Error(400, "An address book with this name already exists or the name is "
                           "reserved. ERROR_ADDRESSBOOK_DUPLICATE")
    book = store.create_address_book(name=name, visibility=visibility)
    backend_of(request).wrote()
    return json_response({"id": book.id, "name": book.name, "visibility": book.visibility,
                          "contacts": book.contacts})


@routes.post("/v2/address-books/{book_id}/contacts")
async def add_to_address_book(request: web.Request) -> web.Response:
    store = store_of(request)
    book = store.address_books.get(_path_int(request, "book_id"))
    if book is None:
        raise V2Error(404, "Error: ERROR_ADDRESSBOOK_NOT_FOUND")
    body = await _body(request)
    existing = store.by_email(_email_field(body)) if isinstance(body, dict) else None
    if existing is not None and existing.suppressed:
        raise contact_suppressed()
    backend = backend_of(request)
    now = backend.now_ms()
    contact, _ = _upsert(store, body, now)
    store.add_to_book(contact, book, now_ms=now)
    backend.wrote()
    return json_response(api_contact(contact, full=True))
