"""The v3 contacts API: get, patch (create 201 / update 200), list with filters, import.

Errors are ``{"errorCode": "contacts:...", "description", "details"}``. Choices where dotdigital
documents nothing (inferred):

- A preference change bumps the contact's ``updated`` (every write does), so ``~modified`` finds
  contacts whose preferences changed.
- ``preferences`` on a read lists only the preferences the contact is opted in to (the schema
  says so); use the v2 ``subscriptions`` call to see opt-outs.
- A single-contact GET/PATCH answer carries everything; a list carries identifiers, status and
  times plus what ``include`` and ``data-fields`` ask for.
- Without ``~modified``/``~created`` a list is in contact-id order; with one, ascending by that
  time then id. ``limit`` defaults to 1000. ``_links`` carry ``self``, ``first`` and, when there
  is more, ``next``; there is no ``prev``/``last``.
- ``~listId`` and ``~segmentId`` are not supported (``contacts:invalidFilter``).
- Bad query parameters answer ``contacts:invalidParameter``, bad markers
  ``contacts:invalidMarker``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from services.simulators.base import json_response
from services.simulators.dotdigital.dates import format_ms, parse_v3_filter_date
from services.simulators.dotdigital.errors import V3Error, bad_json_v3, v3_not_found
from services.simulators.dotdigital.imports import TooManyActiveImports
from services.simulators.dotdigital.model import Contact, v3_email_status, v3_status, valid_email
from services.simulators.dotdigital.store import AccountStore, FeedKind
from services.simulators.dotdigital.transport import (
    BadBody,
    backend_of,
    base_url,
    read_json,
    store_of,
    user_of,
)
from services.simulators.dotdigital.v3write import (
    IDENTIFIERS,
    MERGE_OPTIONS,
    ShapeError,
    apply_contact_request,
    parse_contact_request,
)

# each route is declared on its handler
routes = web.RouteTableDef()

DEFAULT_LIMIT = 1000
MAX_LIMIT = 5000
INCLUDES = ("channelProperties", "lists", "preferences", "consentRecords")
_PATCH_MERGE = {"overwrite": "overwrite", "overwrite-if-not-empty": "overwriteIfNotEmpty",
                "overwrite-if-empty": "overwriteIfEmpty"}


def invalid_parameter(name: str, text: str) -> V3Error:
    return V3Error(400, "contacts:invalidParameter", text, [(name, text)])


# --- rendering -------------------------------------------------------------------------------

class ContactRenderer:
    """Renders v3 contacts for one answer; per-answer lookups are prepared once."""

    def __init__(self, store: AccountStore, *, include: frozenset[str],
                 data_fields: list[str] | None) -> None:
        self._store = store
        self._include = include
        self._data_fields = data_fields
        self._leaves = ([(p, store.states[p.id].opted.values())
                         for p in store.preferences.leaves()]
                        if "preferences" in include else [])

    def __call__(self, contact: Contact) -> dict[str, Any]:
        identifiers: dict[str, Any] = {"email": contact.email}
        if contact.mobile_number:
            identifiers["mobileNumber"] = contact.mobile_number
        out: dict[str, Any] = {
            "contactId": contact.id, "status": v3_status(contact.status),
            "created": format_ms(contact.created_ms), "updated": format_ms(contact.updated_ms),
            "identifiers": identifiers,
        }
        include, wanted = self._include, self._data_fields
        if wanted is not None:
            fields = contact.data_fields
            out["dataFields"] = (dict(fields) if wanted == ["[[ALL]]"]
                                 else {name: fields.get(name) for name in wanted})
        if "channelProperties" in include:
            out["channelProperties"] = {"email": {
                "emailType": contact.email_type, "optInType": contact.opt_in_type,
                "status": v3_email_status(contact.status)}}
        if "lists" in include:
            books = self._store.address_books
            list_status = "suppressed" if contact.suppressed else "subscribed"
            out["lists"] = [{"id": book_id, "name": books[book_id].name, "status": list_status}
                            for book_id in contact.lists if book_id in books]
        slot = contact.slot
        opted = [{"id": p.id, "isOptedIn": True, "publicName": p.public_name,
                  "privateName": p.private_name}
                 for p, states in self._leaves if states[slot] == 1]
        if opted:
            out["preferences"] = opted
        if "consentRecords" in include and contact.consent_records:
            out["consentRecords"] = list(contact.consent_records)
        return out


def _full(store: AccountStore, contact: Contact) -> dict[str, Any]:
    return ContactRenderer(store, include=frozenset(INCLUDES), data_fields=["[[ALL]]"])(contact)


# --- single contact --------------------------------------------------------------------------

def _identifier(request: web.Request) -> tuple[str, Any]:
    identifier = request.match_info["identifier"]
    value = request.match_info["value"]
    if identifier not in IDENTIFIERS:
        raise V3Error(400, "contacts:invalidId",
                      f"The identifier '{identifier}' does not exist in this account",
                      [(identifier, "Unknown identifier")])
    if identifier == "contactId":
        if not (value.isascii() and value.isdigit()):
            raise V3Error(400, "contacts:invalidId",
                          f"The id value '{value}' is invalid for the identifier 'contactId'",
                          [(value, "Invalid value for 'contactId'")])
        return identifier, int(value)
    if identifier == "email" and not valid_email(value):
        raise V3Error(400, "contacts:invalidId",
                      f"The id value '{value}' is invalid for the identifier 'email'",
                      [(value, "Invalid value for 'email'")])
    return identifier, value


@routes.get("/contacts/v3/{identifier}/{value}")
async def get_contact(request: web.Request) -> web.Response:
    identifier, value = _identifier(request)
    store = store_of(request)
    if identifier == "contactId":
        contact = store.by_id(value)
    elif identifier == "mobileNumber":
        contact = store.by_mobile(value)
    else:
        contact = store.by_email(value)
    if contact is None:
        raise v3_not_found(identifier, str(value))
    return json_response(_full(store, contact))


async def _json(request: web.Request) -> Any:
    try:
        return await read_json(request)
    except BadBody:
        raise bad_json_v3() from None


@routes.patch("/contacts/v3/{identifier}/{value}")
async def patch_contact(request: web.Request) -> web.Response:
    identifier, value = _identifier(request)
    option = request.query.get("merge-option", "overwrite")
    if option not in _PATCH_MERGE:
        raise invalid_parameter("merge-option", "merge-option must be overwrite, "
                                "overwrite-if-not-empty or overwrite-if-empty")
    body = await _json(request)
    backend = backend_of(request)
    try:
        req = parse_contact_request(body, usual=backend.usual_paths)
    except ShapeError as exc:
        raise exc.as_v3() from None
    store = store_of(request)
    outcome = apply_contact_request(store, req, identifier=identifier, value=value,
                                    merge_option=_PATCH_MERGE[option], now_ms=backend.now_ms(),
                                    strict=True)
    assert outcome.contact is not None
    backend.wrote()
    return json_response(_full(store, outcome.contact), status=201 if outcome.created else 200)


# --- list ------------------------------------------------------------------------------------

def _encode_marker(kind: FeedKind, since: int | None, after: int) -> str:
    raw = orjson.dumps({"k": kind, "s": since, "a": str(after)})  # keys exceed 64 bits
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_marker(marker: str) -> tuple[FeedKind, int | None, int]:
    try:
        data = orjson.loads(base64.urlsafe_b64decode(marker + "=" * (-len(marker) % 4)))
        kind, since, after = data["k"], data["s"], int(data["a"])
        if kind not in ("modified", "created", "id") or after < 0 or \
                not (since is None or isinstance(since, int)):
            raise ValueError(kind)
    except (ValueError, KeyError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise V3Error(400, "contacts:invalidMarker", f"The marker '{marker}' is invalid",
                      [("marker", "Not a marker issued by this API")]) from None
    return kind, since, after


def _list_options(request: web.Request) -> tuple[FeedKind, int | None, frozenset[str],
                                                  list[str] | None, int]:
    query = request.query
    for key in query:
        if key.startswith("~") and key not in ("~modified", "~created"):
            raise V3Error(400, "contacts:invalidFilter", f"The filter '{key}' is not supported",
                          [(key, "Unsupported filter")])
    if "~modified" in query and "~created" in query:
        raise V3Error(400, "contacts:invalidFilter",
                      "~created and ~modified cannot be used together",
                      [("~created", "Cannot be combined with ~modified")])
    kind: FeedKind = "id"
    since = None
    for key, name in (("~modified", "modified"), ("~created", "created")):
        if key in query:
            raw = query[key]
            op, sep, text = raw.partition("::")
            parsed = parse_v3_filter_date(text) if sep and op == "gte" else None
            if parsed is None:
                raise V3Error(400, "contacts:invalidFilter",
                              f"The filter value '{raw}' is invalid", [(key, raw)])
            kind, since = ("modified" if name == "modified" else "created"), parsed
    include = frozenset(x for x in query.get("include", "").replace(",", "|").split("|") if x)
    unknown = include - set(INCLUDES)
    if unknown:
        raise invalid_parameter("include", f"include may hold {', '.join(INCLUDES)}")
    fields_raw = query.get("data-fields")
    data_fields = None
    if fields_raw:
        data_fields = (["[[ALL]]"] if fields_raw == "[[ALL]]"
                       else [f.upper() for f in fields_raw.split("|") if f])
    limit_raw = query.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(limit_raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise invalid_parameter("limit", f"limit must be between 1 and {MAX_LIMIT}")
    return kind, since, include, data_fields, limit


def _link(request: web.Request, marker: str | None) -> str:
    params = [(k, v) for k, v in request.query.items() if k != "marker"]
    if marker:
        params.append(("marker", marker))
    query = urlencode(params, safe=":|[]~")
    return f"{base_url(request)}/contacts/v3" + (f"?{query}" if query else "")


@routes.get("/contacts/v3")
async def list_contacts(request: web.Request) -> web.Response:
    kind, since, include, data_fields, limit = _list_options(request)
    marker = request.query.get("marker")
    after = None
    if marker:
        kind, since, after = _decode_marker(marker)
    store = store_of(request)
    page, next_after = store.feed(kind, since_ms=since, after=after, limit=limit)
    links: dict[str, Any] = {
        "self": {"marker": marker or "", "link": _link(request, marker)},
        "first": {"marker": "", "link": _link(request, None)},
    }
    if next_after is not None:
        next_marker = _encode_marker(kind, since, next_after)
        links["next"] = {"marker": next_marker, "link": _link(request, next_marker)}
    render = ContactRenderer(store, include=include, data_fields=data_fields)
    items = [render(c) for c in page]
    return json_response({"_links": links, "_items": items})


# --- import ----------------------------------------------------------------------------------

@routes.put("/contacts/v3/import")
async def start_import(request: web.Request) -> web.Response:
    body = await _json(request)
    if not isinstance(body, dict):
        raise bad_json_v3()
    merge = body.get("mergeOption", "overwrite")
    if merge not in MERGE_OPTIONS:
        raise bad_json_v3("The request JSON does not match the expected schema",
                          [("mergeOption", "must be overwrite, overwriteIfNotEmpty or "
                                           "overwriteIfEmpty")])
    contacts = body.get("contacts")
    if not isinstance(contacts, list) or not contacts:
        raise V3Error(400, "contacts:noContactsSpecified",
                      "You must specify 1 or more contacts to import")
    backend = backend_of(request)
    requests = []
    details: list[tuple[str, str]] = []
    for i, raw in enumerate(contacts):
        try:
            requests.append(parse_contact_request(raw, where=f"contacts[{i}].", in_import=True,
                                                  usual=backend.usual_paths))
        except ShapeError as exc:
            details.extend(exc.details)
    if details:
        raise bad_json_v3("The request JSON does not match the expected schema", details[:100])
    try:
        job = backend.imports.submit(account_id=user_of(request).account_id,
                                     merge_option=merge, requests=requests)
    except TooManyActiveImports:
        raise V3Error(429, "contacts:tooManyActiveImports",
                      "Your import request cannot be accepted as too many imports are being "
                      "processed for your account. Please wait for an import to complete and "
                      "then resubmit.") from None
    return json_response({"importId": job.import_id}, status=202)


@routes.get("/contacts/v3/import/{import_id}")
async def get_import(request: web.Request) -> web.Response:
    import_id = request.match_info["import_id"]
    job = backend_of(request).imports.get(account_id=user_of(request).account_id,
                                          import_id=import_id)
    if job is None:
        raise V3Error(404, "contacts:importNotFound",
                      f"The import request '{import_id}' could not be found!")
    if job.result is None:
        return json_response({"importId": job.import_id, "status": "NotFinished"})
    return json_response(job.result)
