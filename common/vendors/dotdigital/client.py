"""The dotdigital REST API client (v2 preferences/subscriptions, v3 contacts and imports).

HTTP Basic with the account's API user. Every call is paced inside the account's per-minute
call budget less its reserve (shared with the other processes calling as the same API user when
a budget ledger is given), waits as ``X-RateLimit-Reset`` / ``Retry-After`` say on a 429, and retries 5xx and
connection failures with jitter. Emails always travel URL-encoded (``+`` as ``%2B``), dates in
paths as ``YYYY-MM-DDTHH:MM:SS.fffZ``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import gc
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Container, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import aiohttp

from common.config import DotdigitalConfig
from common.vendors.base import (
    AuthenticationError,
    ClockReading,
    ClockReadings,
    RequestObserver,
    RetryPolicy,
    ThrottledError,
    TransportError,
    VendorError,
    WriteRefused,
    http_date,
    parse_wait,
)
from common.vendors.budget import BudgetLedger
from common.vendors.dotdigital.models import (
    AccountInfo,
    ContactOptIns,
    ContactStatusV3,
    ContactV3,
    FeedPage,
    ImportContact,
    ImportReport,
    OptInEntry,
    ResubscribeResult,
    Suppression,
    contact_status_v3,
    feed_page,
    opt_in_page,
    opt_ins_contact,
    opt_ins_last_id,
    parse_account_info,
    parse_contact,
    parse_contact_opt_ins,
    parse_contact_v3,
    parse_datetime,
    parse_import_report,
    parse_suppression,
    path_date,
    preference_items,
)
from common.vendors.dotdigital.models import Contact as Contact
from common.vendors.http import (
    HttpResponse,
    Redactor,
    VendorClient,
    VendorHttp,
    decode_json,
    encoded_url,
    json_body,
)

VENDOR = "dotdigital"
# A page of the opt-ins feed, as a reader makes it of the answer.
P = TypeVar("P")
TOO_MANY_ACTIVE_IMPORTS = "contacts:tooManyActiveImports"
APIUSAGE_EXCEEDED = "ERROR_APIUSAGE_EXCEEDED"
PREFERENCE_NOT_FOUND = "ERROR_PREFERENCE_NOT_FOUND"
# Paging sizes the API allows: opt-ins-since answers at most 1000 contacts a call; the v2
# select/skip lists take select 1..1000; v3 lists take limit 1..5000.
OPT_INS_PAGE = 1000
V2_SELECT = 1000
V3_MAX_LIMIT = 5000
_ERROR_TOKEN = re.compile(r"\bERROR_[A-Z0-9_]+\b")
_MERGE_OPTIONS = {"overwrite": "overwrite", "overwrite-if-not-empty": "overwriteIfNotEmpty",
                  "overwrite-if-empty": "overwriteIfEmpty"}
# How long the preference tree (used to place leaves under their categories) is trusted.
_TREE_TTL_S = 300.0
# Clock readings of the latest answers kept to bound dotdigital's time (``time_before``).
_ANSWERS_KEPT = 64


class ImportFailed(VendorError):
    """A v3 import ended in a failed status (``Failed``, ``RejectedByWatchdog`` …)."""

    def __init__(self, *, report: ImportReport) -> None:
        super().__init__(vendor=VENDOR, status=200, code=report.status,
                         message=f"import {report.import_id} ended as {report.status}")
        self.report = report


class ImportUnfinished(TransportError):
    """A v3 import was accepted but had not finished by its deadline: what it holds may land
    later, or may have landed already. Transient: read back before writing again."""

    def __init__(self, *, import_id: str, waited_s: float) -> None:
        super().__init__(vendor=VENDOR, detail=f"import {import_id} not finished after "
                                               f"{waited_s:.0f} s", maybe_delivered=True)
        self.import_id = import_id


def dotdigital_error(response: HttpResponse) -> VendorError:
    """dotdigital's v2 (``{"message": "… ERROR_X"}``) or v3 (``{"errorCode": …}``) error body
    as a typed error; ``code`` is the ``ERROR_*`` token or the v3 ``errorCode``."""
    body = decode_json(response)
    code, message = "", f"HTTP {response.status}"
    if isinstance(body, dict) and isinstance(body.get("errorCode"), str):
        code = body["errorCode"]
        message = str(body.get("description") or message)
        details = [str(d.get("description")) for d in body.get("details") or []
                   if isinstance(d, dict) and d.get("description")]
        if details:
            # Only the descriptions: the ``item`` of a detail is usually an email address.
            message += " (" + "; ".join(details[:5]) + ")"
    elif isinstance(body, dict) and isinstance(body.get("message"), str):
        message = body["message"]
        token = _ERROR_TOKEN.search(message)
        code = token.group(0) if token else ""
    elif response.body and not response.body.lstrip().startswith((b"{", b"[")):
        message = response.body[:300].decode("utf-8", "replace").strip() or message
    retry_after = parse_wait(response.headers.get("Retry-After"))
    if retry_after is None:
        retry_after = parse_wait(response.headers.get("X-RateLimit-Reset"))
    kwargs: dict[str, Any] = {"vendor": VENDOR, "status": response.status, "code": code,
                              "message": message}
    if response.status == 429:
        if code == TOO_MANY_ACTIVE_IMPORTS:
            # Not the call budget: only imports have to wait, the client carries on.
            return VendorError(retry_after=retry_after, **kwargs)
        return ThrottledError(retry_after=retry_after, **kwargs)
    if response.status == 401 or code == "ERROR_APIUSER_INVALID":
        return AuthenticationError(**kwargs)
    if code == APIUSAGE_EXCEEDED:
        # Flat-scheme accounts are capped with a 400; surfaced as throttling, not retried.
        return ThrottledError(retry_after=retry_after, **kwargs)
    return VendorError(**kwargs)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector paused while a feed page is decoded and read (no await within).

    An answer is a tree of some 4,000 dicts and lists a page, built and dropped within this
    (reference counting frees it: a tree has no cycle for the collector to find); left on, the
    collector would walk it a few times over as it is built, and move it to the oldest
    generation, whose full walks of every object of the process would then come sooner."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _with_last_id(data: list[Any]) -> tuple[list[Any], int, int]:
    """An opt-ins page as answered, its greatest contact id and its length."""
    return data, opt_ins_last_id(data), len(data)


def _entries_page(data: list[Any], preference_id: int, wanted: Callable[[str], bool] | None
                  ) -> tuple[list[OptInEntry], int, int]:
    """An opt-ins page as its opt-ins to one preference, its greatest contact id and its
    length."""
    entries, last_id = opt_in_page(data, preference_id, wanted=wanted)
    return entries, last_id, len(data)


def _feed_page(data: list[Any], preference_id: int) -> tuple[FeedPage, int, int]:
    """An opt-ins page as the ec-poller reads it, its greatest contact id and its length."""
    page = feed_page(data, preference_id)
    return page, page.last_id, len(data)


def _segment(value: str | int) -> str:
    """One URL path segment: everything but unreserved characters and ``@`` percent-encoded."""
    return quote(str(value), safe="@")


class DotdigitalClient(VendorClient):
    """One dotdigital account (one API user).

    Use as ``async with DotdigitalClient(config=...) as client``. The client owns its aiohttp
    session unless one is passed in (then the caller closes it). Processes that call as the same
    API user share its budget through ``budget_ledger`` (the ledger store); without one, the
    client spends the whole budget (less its reserve) on its own.
    """

    def __init__(
        self,
        *,
        config: DotdigitalConfig,
        session: aiohttp.ClientSession | None = None,
        on_request: RequestObserver | None = None,
        retry: RetryPolicy | None = None,
        read_only: bool = False,
        budget_ledger: BudgetLedger | None = None,
    ) -> None:
        self._config = config
        # a dry run's client: anything but a GET is refused before it is sent
        self._read_only = read_only
        self._base = config.url.rstrip("/")
        password = config.password.reveal()
        credentials = base64.b64encode(f"{config.api_user}:{password}".encode()).decode()
        self._authorization = {"Authorization": f"Basic {credentials}"}
        self._http = VendorHttp.for_user(
            vendor=VENDOR, config=config,
            # dotdigital counts calls per minute (per account; one API user per account here)
            calls=config.calls_per_minute, window_s=60.0, bucket=f"dotdigital:{config.api_user}",
            errors=dotdigital_error, redactor=Redactor([password, credentials]), retry=retry,
            on_request=on_request, session=session, budget_ledger=budget_ledger)
        self._tree_parents: dict[int, int] = {}
        self._tree_loaded_at: float | None = None
        # dotdigital's clock, timed, as server-time tells it and as the answer that bounds a
        # read's start (``time_before``) does: what the account's clock estimate is made of.
        # Not every answer's: a reading folded in late (after the clock stepped) would be taken
        # for a step of its own.
        self.clock_readings = ClockReadings()
        # every answer's clock reading (server-time, else the ``Date`` header), for
        # ``time_before``
        self._answers: deque[ClockReading] = deque(maxlen=_ANSWERS_KEPT)

    def __repr__(self) -> str:
        return f"DotdigitalClient(url={self._base!r}, api_user={self._config.api_user!r})"

    # -- transport -------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        params: Mapping[str, str | int] | None = None,
        body: Any = None,
        idempotent: bool = True,
        accept: Callable[[HttpResponse], bool] | None = None,
        dated: bool = True,
        send_by: float | None = None,
    ) -> HttpResponse:
        """``path`` is already encoded; ``endpoint`` is its route template (no emails or ids).
        ``dated``: the answer's ``Date`` header is kept as a clock reading for
        ``time_before`` (server-time has a finer one of its own). ``send_by``: see
        :meth:`~common.vendors.http.VendorHttp.request`."""
        if self._read_only and method != "GET":
            raise WriteRefused(vendor=VENDOR, endpoint=endpoint)
        url = self._base + path
        if params:
            url += "?" + urlencode({k: str(v) for k, v in params.items()}, safe=":~")
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            payload = json_body(body)

        async def authorization() -> Mapping[str, str]:
            return self._authorization

        response = await self._http.request(method, encoded_url(url), endpoint=endpoint,
                                            headers=headers, auth_headers=authorization,
                                            body=payload, idempotent=idempotent, accept=accept,
                                            send_by=send_by)
        moment = http_date(response.headers.get("Date")) if dated else None
        if moment is not None and response.sent_at:
            self._answers.append(ClockReading(vendor_time=moment, resolution_s=1.0,
                                              sent=response.sent_at,
                                              received=response.received_at, source="date"))
        return response

    async def _json(self, method: str, path: str, *, endpoint: str,
                    params: Mapping[str, str | int] | None = None, body: Any = None,
                    idempotent: bool = True, send_by: float | None = None) -> Any:
        response = await self._call(method, path, endpoint=endpoint, params=params, body=body,
                                    idempotent=idempotent, send_by=send_by)
        return decode_json(response)

    @staticmethod
    def _list(data: Any, what: str) -> list[Any]:
        if not isinstance(data, list):
            raise VendorError(vendor=VENDOR, status=200, code="",
                              message=f"expected a JSON array of {what}")
        return data

    # -- account ---------------------------------------------------------------------------

    async def account_info(self) -> AccountInfo:
        data = await self._json("GET", "/v2/account-info", endpoint="GET /v2/account-info")
        return parse_account_info(data)

    async def server_time(self) -> datetime:
        """The API's own UTC time (milliseconds).

        Each answer is also kept, with the round trip it came in, in ``clock_readings``."""
        return (await self._server_time_reading()).vendor_time

    async def _server_time_reading(self) -> ClockReading:
        response = await self._call("GET", "/v2/server-time", endpoint="GET /v2/server-time",
                                    dated=False)
        reading = ClockReading(vendor_time=parse_datetime(decode_json(response)),
                               resolution_s=0.001, sent=response.sent_at,
                               received=response.received_at, source="server-time")
        self.clock_readings.add(reading)
        self._answers.append(reading)
        return reading

    async def time_before(self, moment: float) -> datetime:
        """A dotdigital time its clock had passed by our Unix time ``moment``: the watermark of
        a ``…-since`` read begun after ``moment`` (whatever is stamped later is read next time).

        Taken from the first answer received since ``moment`` (any call's; one server-time
        call only when there is none). Its reading was stamped before we received it, so at
        ``moment`` the clock showed at least the reading, less its resolution (in case the
        clock rounds rather than truncates) and less the time from ``moment`` to its receipt.
        The reading goes to ``clock_readings`` too (a server-time one is there already)."""
        reading = next((r for r in self._answers if r.received >= moment), None)
        if reading is None:
            reading = await self._server_time_reading()
        elif reading.source == "date":
            self.clock_readings.add(reading)
        return reading.vendor_time - timedelta(
            seconds=reading.resolution_s + reading.received - moment)

    async def time_after(self, moment: float) -> datetime:
        """A dotdigital time its clock had not reached when it answered the calls we received
        answers to since our Unix time ``moment``: whatever those calls did is stamped
        earlier. The end of a write's window, from the write's own answers (their ``Date``
        headers: whole seconds, so one second later); one server-time call only when none
        since ``moment`` is kept."""
        readings = [r for r in self._answers if r.received >= moment]
        if not readings:
            readings = [await self._server_time_reading()]
        return max(r.vendor_time + timedelta(seconds=r.resolution_s) for r in readings)

    @property
    def tree_fresh(self) -> bool:
        """Whether the preference tree a preferences PUT needs is at hand (no call to read it)."""
        return (self._tree_loaded_at is not None
                and time.monotonic() - self._tree_loaded_at < _TREE_TTL_S)

    async def probe_clock(self) -> None:
        """Read the API's clock once more (one call), into ``clock_readings``."""
        await self.server_time()

    # -- preference definitions ------------------------------------------------------------

    async def preferences(self) -> list[dict[str, Any]]:
        """The preference tree: categories (``isPreference`` false) holding ``preferences``,
        and top-level preferences."""
        data = await self._json("GET", "/v2/preferences", endpoint="GET /v2/preferences")
        tree = self._list(data, "preferences")
        self._remember_tree(tree)
        return tree

    def _remember_tree(self, tree: Sequence[Mapping[str, Any]]) -> None:
        parents: dict[int, int] = {}
        for node in tree:
            if node.get("isPreference"):
                parents[int(node["id"])] = 0
            for child in node.get("preferences") or []:
                parents[int(child["id"])] = int(node["id"])
        self._tree_parents = parents
        self._tree_loaded_at = time.monotonic()

    @staticmethod
    def _preference_body(*, public_name: str, private_name: str, is_preference: bool,
                         is_public: bool, order: int | None, category_id: int) -> dict[str, Any]:
        body: dict[str, Any] = {"publicName": public_name, "privateName": private_name,
                                "isPreference": is_preference, "isPublic": is_public,
                                "categoryId": category_id}
        if order is not None:
            body["order"] = order
        return body

    async def create_preference(self, *, public_name: str, private_name: str | None = None,
                                is_preference: bool = True, is_public: bool = True,
                                order: int | None = None, category_id: int = 0
                                ) -> dict[str, Any]:
        """Create a preference (or, with ``is_preference=False``, a category)."""
        body = self._preference_body(public_name=public_name,
                                     private_name=private_name or public_name,
                                     is_preference=is_preference, is_public=is_public,
                                     order=order, category_id=category_id)
        data = await self._json("POST", "/v2/preferences", endpoint="POST /v2/preferences",
                                body=body, idempotent=False)
        self._tree_loaded_at = None
        return data if isinstance(data, dict) else {}

    async def update_preference(self, preference_id: int, *, public_name: str,
                                private_name: str | None = None, is_preference: bool = True,
                                is_public: bool = True, order: int | None = None,
                                category_id: int = 0) -> dict[str, Any]:
        body = self._preference_body(public_name=public_name,
                                     private_name=private_name or public_name,
                                     is_preference=is_preference, is_public=is_public,
                                     order=order, category_id=category_id)
        body["id"] = preference_id
        data = await self._json("PUT", f"/v2/preferences/{int(preference_id)}",
                                endpoint="PUT /v2/preferences/{preferenceId}", body=body)
        self._tree_loaded_at = None
        return data if isinstance(data, dict) else {}

    async def delete_preference(self, preference_id: int) -> None:
        """Delete a preference, or a category with its preferences."""
        await self._call("DELETE", f"/v2/preferences/{int(preference_id)}",
                         endpoint="DELETE /v2/preferences/{preferenceId}")
        self._tree_loaded_at = None

    # -- contacts (v2) ---------------------------------------------------------------------

    async def contact(self, email_or_id: str | int) -> Contact:
        """A contact by email or id (``ERROR_CONTACT_NOT_FOUND`` 404 when unknown)."""
        data = await self._json("GET", f"/v2/contacts/{_segment(email_or_id)}",
                                endpoint="GET /v2/contacts/{idOrEmail}")
        return parse_contact(data)

    async def contact_preferences(self, email: str) -> list[dict[str, Any]]:
        """The preference tree with this contact's ``isOptedIn`` on each preference."""
        data = await self._json("GET", f"/v2/contacts/{_segment(email)}/preferences",
                                endpoint="GET /v2/contacts/{email}/preferences")
        return self._list(data, "preferences")

    async def subscriptions(self, email: str) -> ContactOptIns:
        """The contact's opt-in records, each with the time it last changed."""
        data = await self._json("GET", f"/v2/contacts/{_segment(email)}/subscriptions",
                                endpoint="GET /v2/contacts/{email}/subscriptions")
        return parse_contact_opt_ins(data)

    async def _parents_for(self, ids: Sequence[int]) -> dict[int, int]:
        if not self.tree_fresh or any(i not in self._tree_parents for i in ids):
            await self.preferences()
        return self._tree_parents

    async def update_contact_preferences(self, email: str, changes: Mapping[int, bool], *,
                                         send_by: float | None = None) -> None:
        """Opt the contact in or out of the given preferences; others stay as they are;
        never sent after ``send_by`` (``time.monotonic()``; a pause past it raises
        :class:`~common.vendors.base.ThrottledError` at once).

        Sent as ``PUT /v2/contacts/{email}/preferences`` in the documented shape: preferences
        inside a category go in that category's ``preferences`` list, top-level ones as items
        of their own (the tree is read, and cached for a few minutes, to know which is which).
        An id unknown to the tree is sent as a top-level item so the API can name the problem.
        """
        if not changes:
            return
        parents = await self._parents_for(list(changes))
        categories: dict[int, list[dict[str, Any]]] = {}
        top: list[dict[str, Any]] = []
        for preference_id, opted_in in changes.items():
            item = {"id": int(preference_id), "isPreference": True, "isOptedIn": bool(opted_in)}
            parent = parents.get(int(preference_id), 0)
            if parent:
                categories.setdefault(parent, []).append(item)
            else:
                top.append(item)
        body = [{"id": cid, "isPreference": False, "preferences": items}
                for cid, items in categories.items()] + top
        await self._call("PUT", f"/v2/contacts/{_segment(email)}/preferences",
                         endpoint="PUT /v2/contacts/{email}/preferences", body=body,
                         send_by=send_by)

    async def iter_opt_ins_since(self, preference_id: int, since: datetime, *,
                                 min_contact_id: int = 0, emails: Container[str] | None = None,
                                 ) -> AsyncIterator[list[ContactOptIns]]:
        """Contacts whose opt-in to ``preference_id`` changed (either way) since ``since``.

        Pages by ``minContactId`` (the next page starts at the last id + 1), at most 1000
        contacts a call, in contact-id order; ``min_contact_id`` resumes a read part-way.
        With ``emails`` (trimmed, lower case) only those contacts are built and yielded (pages
        with none of them are not); the paging still goes by every contact answered.
        """
        async for data in self._opt_ins_pages(preference_id, since, min_contact_id,
                                              read=_with_last_id):
            if emails is None:
                page = [parse_contact_opt_ins(item) for item in data]
            else:
                page = [parse_contact_opt_ins(item) for item in data
                        if opt_ins_contact(item)[1] in emails]
            if page:
                yield page

    async def iter_opt_in_entries(self, preference_id: int, since: datetime, *,
                                  wanted: Callable[[str], bool] | None = None
                                  ) -> AsyncIterator[list[OptInEntry]]:
        """:meth:`iter_opt_ins_since`, each page as the opt-ins to ``preference_id`` alone
        (:func:`~common.vendors.dotdigital.models.opt_in_page`): no contact is built. With
        ``wanted``, only the entries of emails (trimmed, lower case) it wants."""
        async for page in self._opt_ins_pages(
                preference_id, since, 0,
                read=functools.partial(_entries_page, preference_id=preference_id,
                                       wanted=wanted)):
            if page:
                yield page

    async def iter_feed_contacts(self, preference_id: int, since: datetime, *,
                                 min_contact_id: int = 0) -> AsyncGenerator[FeedPage, None]:
        """:meth:`iter_opt_ins_since`, each page as the ec-poller reads it (its contacts' ids,
        emails and statuses, their opt-ins to ``preference_id``, in columns:
        :func:`~common.vendors.dotdigital.models.feed_page`): no contact is built."""
        async for page in self._opt_ins_pages(
                preference_id, since, min_contact_id,
                read=functools.partial(_feed_page, preference_id=preference_id)):
            if page.contact_ids:
                yield page

    async def _opt_ins_pages(self, preference_id: int, since: datetime, min_contact_id: int, *,
                             read: Callable[[list[Any]], tuple[P, int, int]]
                             ) -> AsyncIterator[P]:
        """The pages of the opt-ins feed (see :meth:`iter_opt_ins_since`), each as ``read``
        makes it of the answer, with its greatest contact id (where the next page starts) and
        how many contacts it answered."""
        path = (f"/v2/contacts/with-preference/{int(preference_id)}/opt-ins-since/"
                f"{path_date(since)}")
        endpoint = "GET /v2/contacts/with-preference/{preferenceId}/opt-ins-since/{date}"
        while True:
            response = await self._call("GET", path, endpoint=endpoint,
                                        params={"minContactId": min_contact_id})
            with _collector_paused():
                # (the answer is not held while the page is worked on: only what read makes)
                page, last_id, answered = read(self._list(decode_json(response), "opt-ins"))
            yield page
            if answered < OPT_INS_PAGE:
                return
            if last_id < min_contact_id:
                # a full page that does not move past where it started (ids missing or
                # lower): asking again would answer the same page for ever
                raise VendorError(vendor=VENDOR, status=200, code="",
                                  message=f"an opt-ins page from contact id {min_contact_id} "
                                          f"holds no contact id at or past it")
            min_contact_id = last_id + 1

    async def _iter_removed(self, kind: str, since: datetime) -> AsyncIterator[list[Suppression]]:
        path = f"/v2/contacts/{kind}-since/{path_date(since)}"
        endpoint = f"GET /v2/contacts/{kind}-since/{{date}}"
        skip = 0
        while True:
            data = await self._json("GET", path, endpoint=endpoint,
                                    params={"select": V2_SELECT, "skip": skip})
            page = [parse_suppression(item) for item in self._list(data, "suppressions")]
            if page:
                yield page
            if len(page) < V2_SELECT:
                return
            skip += len(page)

    def iter_suppressed_since(self, since: datetime) -> AsyncIterator[list[Suppression]]:
        """Contacts suppressed (any reason) since ``since``; ``select``/``skip`` paging."""
        return self._iter_removed("suppressed", since)

    def iter_unsubscribed_since(self, since: datetime) -> AsyncIterator[list[Suppression]]:
        """Contacts who unsubscribed since ``since``; ``select``/``skip`` paging."""
        return self._iter_removed("unsubscribed", since)

    async def unsubscribe(self, email: str) -> Suppression:
        """Unsubscribe the contact from all mail (account level)."""
        data = await self._json("POST", "/v2/contacts/unsubscribe",
                                endpoint="POST /v2/contacts/unsubscribe", body={"email": email})
        return parse_suppression(data)

    async def resubscribe(self, email: str, *, challenge: bool,
                          preferred_locale: str | None = None,
                          return_url: str | None = None) -> ResubscribeResult:
        """Resubscribe an unsubscribed contact. With ``challenge`` the contact confirms by email
        (``ContactChallenged``); without, it is resubscribed at once: only with consent."""
        body: dict[str, Any] = {"unsubscribedContact": {"email": email}}
        if challenge:
            path, endpoint = "/v2/contacts/resubscribe", "POST /v2/contacts/resubscribe"
            if preferred_locale:
                body["preferredLocale"] = preferred_locale
            if return_url:
                body["returnUrlToUseIfChallenged"] = return_url
        else:
            path = "/v2/contacts/resubscribe-with-no-challenge"
            endpoint = "POST /v2/contacts/resubscribe-with-no-challenge"
        data = await self._json("POST", path, endpoint=endpoint, body=body)
        item = data if isinstance(data, dict) else {}
        contact = parse_contact(item["contact"]) if isinstance(item.get("contact"), dict) else None
        return ResubscribeResult(contact=contact, status=str(item.get("status") or ""))

    # -- contacts (v3) ---------------------------------------------------------------------

    async def get_contact_v3(self, email: str, *,
                             include: Sequence[str] = ("preferences",)) -> ContactV3:
        params = {"include": ",".join(include)} if include else None
        data = await self._json("GET", f"/contacts/v3/email/{_segment(email)}",
                                endpoint="GET /contacts/v3/email/{email}", params=params)
        return parse_contact_v3(data)

    async def patch_contact_v3(self, email: str, *, preferences: Mapping[int, bool],
                               merge_option: str = "overwrite") -> ContactV3:
        """Set preference opt-ins on a contact (created if it does not exist)."""
        if merge_option not in _MERGE_OPTIONS:
            raise ValueError(f"merge_option must be one of {sorted(_MERGE_OPTIONS)}")
        body = {"identifiers": {"email": email}, "preferences": preference_items(preferences)}
        data = await self._json("PATCH", f"/contacts/v3/email/{_segment(email)}",
                                endpoint="PATCH /contacts/v3/email/{email}",
                                params={"merge-option": merge_option}, body=body)
        return parse_contact_v3(data)

    async def iter_contacts_v3(self, *, modified_since: datetime,
                               include: Sequence[str] = ("preferences",),
                               limit: int = 1000) -> AsyncIterator[list[ContactV3]]:
        """Contacts modified since ``modified_since`` (ascending), following the ``next``
        marker until there is none."""
        async for items in self._contacts_v3_pages(modified_since=modified_since,
                                                   include=include, limit=limit):
            yield [parse_contact_v3(c) for c in items]

    async def iter_contact_statuses(self, *, modified_since: datetime,
                                    limit: int = 1000) -> AsyncIterator[list[ContactStatusV3]]:
        """:meth:`iter_contacts_v3` (no ``include``), each contact as its id, email, status
        and ``updated`` alone (:func:`~common.vendors.dotdigital.models.contact_status_v3`):
        no contact is built, no time parsed."""
        async for items in self._contacts_v3_pages(modified_since=modified_since, include=(),
                                                   limit=limit):
            yield [contact_status_v3(c) for c in items]

    async def _contacts_v3_pages(self, *, modified_since: datetime, include: Sequence[str],
                                 limit: int) -> AsyncIterator[list[Any]]:
        """The items of each page of ``GET /contacts/v3`` modified since ``modified_since``
        (none empty), following the ``next`` marker until there is none."""
        if not 1 <= limit <= V3_MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {V3_MAX_LIMIT}")
        params: dict[str, str | int] = {"~modified": f"gte::{path_date(modified_since)}",
                                        "limit": limit}
        if include:
            params["include"] = ",".join(include)
        while True:
            data = await self._json("GET", "/contacts/v3", endpoint="GET /contacts/v3",
                                    params=params)
            item = data if isinstance(data, dict) else {}
            items = self._list(item.get("_items") or [], "contacts")
            if not items:
                return
            yield items
            following = (item.get("_links") or {}).get("next")
            marker = following.get("marker") if isinstance(following, dict) else None
            if not marker:
                return
            params["marker"] = str(marker)

    async def start_import(self, contacts: Sequence[ImportContact], *,
                           merge_option: str = "overwrite", send_by: float | None = None) -> str:
        """Submit a v3 import; returns its id. Waits and retries while the account has too
        many active imports (429 ``contacts:tooManyActiveImports``), but never sends it after
        ``send_by`` (``time.monotonic()``)."""
        if not contacts:
            raise ValueError("an import needs at least one contact")
        if merge_option not in _MERGE_OPTIONS:
            raise ValueError(f"merge_option must be one of {sorted(_MERGE_OPTIONS)}")
        body = {"mergeOption": _MERGE_OPTIONS[merge_option],
                "contacts": [c.to_wire() for c in contacts]}
        data = await self._json("PUT", "/contacts/v3/import", endpoint="PUT /contacts/v3/import",
                                body=body, send_by=send_by)
        import_id = data.get("importId") if isinstance(data, dict) else None
        if not isinstance(import_id, str) or not import_id:
            raise VendorError(vendor=VENDOR, status=202, code="",
                              message="import accepted without an importId")
        return import_id

    async def import_status(self, import_id: str) -> ImportReport:
        data = await self._json("GET", f"/contacts/v3/import/{_segment(import_id)}",
                                endpoint="GET /contacts/v3/import/{importId}")
        return parse_import_report(data, import_id=import_id)

    async def import_report(self, import_id: str, *, started: float, first_poll_s: float = 0.5,
                            max_poll_s: float = 30.0, timeout_s: float | None = None
                            ) -> ImportReport:
        """Poll an import submitted at ``started`` (``time.monotonic()``), backing off from
        ``first_poll_s`` to ``max_poll_s``, until it finishes. Raises :class:`ImportFailed` for
        a failed status, and :class:`ImportUnfinished` once ``timeout_s`` (by default the
        account's ``import_deadline_s``) has passed since it was submitted."""
        limit = self._config.import_deadline_s if timeout_s is None else timeout_s
        delay = first_poll_s
        try:
            async with asyncio.timeout(max(0.0, limit - (time.monotonic() - started))):
                while True:
                    await asyncio.sleep(delay)
                    report = await self.import_status(import_id)
                    if report.succeeded:
                        return report
                    if report.done:
                        raise ImportFailed(report=report)
                    delay = min(max_poll_s, delay * 2)
        except TimeoutError:
            raise ImportUnfinished(import_id=import_id,
                                   waited_s=time.monotonic() - started) from None
