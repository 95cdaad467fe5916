"""The Dataverse (Dynamics 365) Web API client: OData v4.0 reads, change tracking, writes and
``$batch``, with OAuth2 client credentials.

Generic over entity sets: the pollers and the writer decide which tables and columns matter.
Every call is paced inside the account's request budget (6000 per 300 s by default) less its
reserve, shared with the other processes calling as the same user when a budget ledger is given,
waits as
``Retry-After`` says on a 429, and retries 5xx and connection failures with jitter.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote
from uuid import UUID

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from common.config import DynamicsConfig
from common.vendors.auth import ClientCredentialsToken
from common.vendors.base import (
    AuthenticationError,
    ClockReading,
    ClockReadings,
    RequestObserver,
    RetryPolicy,
    ThrottledError,
    VendorError,
    WriteRefused,
    http_date,
    parse_wait,
)
from common.vendors.budget import BudgetLedger
from common.vendors.dataverse.batch import (
    MAX_BATCH_PARTS,
    BatchOperation,
    ResponsePart,
    decode_batch,
    encode_batch,
    new_boundary,
)
from common.vendors.http import (
    HttpResponse,
    Redactor,
    VendorClient,
    VendorHttp,
    decode_json,
    encoded_url,
    json_body,
)

__all__ = [
    "CONCURRENCY_VERSION_MISMATCH",
    "EXPIRED_VERSION_STAMP",
    "OBJECT_DOES_NOT_EXIST",
    "BatchOperation",
    "BatchResult",
    "DataverseClient",
    "DeltaPage",
    "DeltaTokenExpired",
    "Page",
    "Query",
    "ReadTogether",
    "WriteResult",
    "odata_literal",
]

VENDOR = "dataverse"
CONCURRENCY_VERSION_MISMATCH = "0x80060882"
OBJECT_DOES_NOT_EXIST = "0x80040217"
EXPIRED_VERSION_STAMP = "0x80044352"
MAX_PAGE_SIZE = 5000
# GET URLs may be 32 KB long; an id filter chunk keeps the whole URL under 8 KB, the request
# line limit of many servers and proxies in between.
_MAX_FILTER_CHARS = 6_000
# Status codes on a saved link that mean "the link itself is no good", not "you may not".
_NOT_LINK_PROBLEMS = frozenset({401, 403, 408, 429})
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_KEY_SEGMENT = re.compile(r"\([^)]*\)")
# Characters left as they are in OData query values; everything else is percent-encoded
# ('+' -> %2B, '&' -> %26, '#' -> %23, space -> %20), as the Web API requires.
_QUERY_SAFE = "$',()*:@/!"


class DeltaTokenExpired(VendorError):
    """A saved change-tracking link can no longer be used: restart with a full read.

    Raised for 400 ``0x80044352`` (ExpiredVersionStamp) and for any other 4xx answered to a
    saved delta or next link (the reference leaves the exact status open).
    """


@dataclass(frozen=True, kw_only=True)
class Page:
    """One page of a collection read."""

    rows: list[dict[str, Any]]
    next_link: str | None
    count: int | None = None


@dataclass(frozen=True, kw_only=True)
class Query:
    """One collection read (what :meth:`DataverseClient.iter_pages` takes), for
    :meth:`DataverseClient.read_together`."""

    entity_set: str
    select: Sequence[str] | None = None
    filter: str | None = None
    page_size: int | None = None


@dataclass(frozen=True, kw_only=True)
class ReadTogether:
    """The first page of each query of one ``$batch``, and the environment's time (its
    ``Date``) when it answered, None if it did not say."""

    pages: list[Page]
    date: datetime | None


@dataclass(frozen=True, kw_only=True)
class DeltaPage:
    """One page of a change-tracking read.

    ``cursor`` is the link to save once this page is processed: ``next_link`` inside the read,
    ``delta_link`` on its last page. Resuming from a saved ``next_link`` finishes the same read.
    """

    rows: list[dict[str, Any]]
    deleted_ids: list[str]
    next_link: str | None
    delta_link: str | None

    @property
    def cursor(self) -> str:
        link = self.next_link or self.delta_link
        assert link is not None  # a page always carries one of the two (checked on receipt)
        return link

    @property
    def last(self) -> bool:
        return self.next_link is None


@dataclass(frozen=True, kw_only=True)
class WriteResult:
    """What a create or update answered: the record id, its new etag, and the body when
    ``return_representation`` was asked (with ``versionnumber`` / ``modifiedon`` if selected)."""

    status: int
    entity_id: str | None
    etag: str | None
    body: dict[str, Any] | None


class BatchResult:
    """The outcome of one batch operation.

    ``status`` 424 (with an ``error``) marks an operation that was not applied because another
    one failed: its change set rolled back, or the batch stopped at the first error. An
    operation that ran before the one that stopped the batch, when the answer holds only the
    failing part, reads 204 with no headers or body.

    The headers, and the record id and etag read from them and the body, are read from the
    operation's answer (``part``) when first asked for: a writer that needs the status and body
    only does not pay for them per operation.
    """

    __slots__ = ("_identity", "_part", "_path", "body", "content_id", "error", "status")

    def __init__(self, *, content_id: str, status: int, body: dict[str, Any] | None,
                 error: VendorError | None, part: ResponsePart | None = None,
                 path: str = "") -> None:
        """``part``: the operation's answer; ``path``: the operation's (see BatchOperation)."""
        self.content_id = content_id
        self.status = status
        self.body = body
        self.error = error
        self._part = part
        self._path = path
        self._identity: tuple[str | None, str | None] | None = None

    def __repr__(self) -> str:
        return (f"BatchResult(content_id={self.content_id!r}, status={self.status}, "
                f"error={self.error!r}, body={self.body!r})")

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status < 300

    @property
    def headers(self) -> Mapping[str, str]:
        return _NO_HEADERS if self._part is None else self._part.headers

    @property
    def entity_id(self) -> str | None:
        """The written record's id (None for a failed operation)."""
        return self._identified()[0]

    @property
    def etag(self) -> str | None:
        """The written record's new etag (None for a failed operation)."""
        return self._identified()[1]

    def _identified(self) -> tuple[str | None, str | None]:
        if self._identity is None:
            entity_set = None if self._path.startswith("$") else self._path.split("(", 1)[0]
            self._identity = (_identity(entity_set, self.headers, self.body)
                              if self._part is not None and self.error is None else (None, None))
        return self._identity


_NO_HEADERS: Mapping[str, str] = CIMultiDictProxy(CIMultiDict[str]())


def dataverse_error(response: HttpResponse) -> VendorError:
    """A Web API error body (``{"error": {"code": "0x…", "message": …}}``) as a typed error."""
    body = decode_json(response)
    code, message = "", f"HTTP {response.status}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code") or "")
        message = str(body["error"].get("message") or message)
    elif response.body and response.content_type.startswith("text/"):
        message = response.body[:300].decode("utf-8", "replace").strip() or message
    kwargs: dict[str, Any] = {"vendor": VENDOR, "status": response.status, "code": code,
                              "message": message}
    if response.status == 429:
        return ThrottledError(retry_after=parse_wait(response.headers.get("Retry-After")),
                              **kwargs)
    if response.status == 401:
        return AuthenticationError(**kwargs)
    if code.lower() == EXPIRED_VERSION_STAMP:
        return DeltaTokenExpired(**kwargs)
    return VendorError(**kwargs)


def parse_stamp(value: object) -> datetime | None:
    """A ``modifiedon``-like value (``2023-04-07T21:59:01Z``) as UTC, or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def odata_literal(value: object) -> str:
    """``value`` as an OData v4 ``$filter`` literal (strings quoted, GUIDs and dates bare)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("datetime literals must be timezone-aware (UTC)")
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    text = str(value)
    if _GUID.match(text):
        return text
    return "'" + text.replace("'", "''") + "'"


def _quote(value: str) -> str:
    return quote(value, safe=_QUERY_SAFE)


def _query(params: Mapping[str, str]) -> str:
    return "&".join(f"{_quote(k)}={_quote(v)}" for k, v in params.items())


def _identity(entity_set: str | None, headers: Mapping[str, str],
              body: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """The written record's id and new etag, from the headers or the returned representation."""
    entity_id = _key_from_entity_url(headers.get("OData-EntityId") or headers.get("Location"))
    if entity_id is None and body is not None and entity_set:
        value = body.get(_guess_primary_key(entity_set))
        entity_id = str(value) if value is not None else None
    etag = headers.get("ETag")
    if etag is None and body is not None and isinstance(body.get("@odata.etag"), str):
        etag = body["@odata.etag"]
    return entity_id, etag


def _key_from_entity_url(url: str | None) -> str | None:
    if not url:
        return None
    match = re.search(r"\(([^()]*)\)\s*$", url)
    return match.group(1) if match else None


def _guess_primary_key(entity_set: str) -> str:
    # contacts -> contactid, opportunities -> opportunityid; used only to read a created
    # record's id out of a returned representation when no OData-EntityId header came back.
    stem = entity_set
    if stem.endswith("ies"):
        stem = stem[:-3] + "y"
    elif stem.endswith("s"):
        stem = stem[:-1]
    return f"{stem}id"


def _is_deleted_entry(row: Mapping[str, Any]) -> bool:
    context = row.get("@odata.context")
    if isinstance(context, str) and context.endswith("$deletedEntity"):
        return True
    return row.get("reason") in ("deleted", "changed") and set(row) <= {"@odata.context", "id",
                                                                     "reason"}


def _collection_params(*, select: Sequence[str] | None = None, filter: str | None = None,
                       orderby: str | None = None, expand: str | None = None,
                       count: bool = False) -> dict[str, str]:
    params: dict[str, str] = {}
    if select:
        params["$select"] = ",".join(select)
    if filter:
        params["$filter"] = filter
    if orderby:
        params["$orderby"] = orderby
    if expand:
        params["$expand"] = expand
    if count:
        params["$count"] = "true"
    return params


def _with_query(path: str, params: Mapping[str, str]) -> str:
    return f"{path}?{_query(params)}" if params else path


def _page_of(data: Mapping[str, Any]) -> Page:
    next_link = data.get("@odata.nextLink")
    total = data.get("@odata.count")
    return Page(rows=list(data.get("value") or []),
                next_link=next_link if isinstance(next_link, str) and next_link else None,
                count=total if isinstance(total, int) else None)


def _chunk_ids(id_column: str, ids: Sequence[str]) -> list[str]:
    """``$filter`` expressions ``col eq a or col eq b …`` each short enough for a GET URL."""
    filters: list[str] = []
    clauses: list[str] = []
    size = 0
    for value in ids:
        clause = f"{id_column} eq {odata_literal(value)}"
        cost = len(_quote(clause)) + len(_quote(" or "))
        if clauses and size + cost > _MAX_FILTER_CHARS:
            filters.append(" or ".join(clauses))
            clauses, size = [], 0
        clauses.append(clause)
        size += cost
    if clauses:
        filters.append(" or ".join(clauses))
    return filters


class DataverseClient(VendorClient):
    """One Dataverse environment (one application user): reads, change tracking and writes.

    Use as ``async with DataverseClient(config=...) as client``. The client owns its aiohttp
    session unless one is passed in (then the caller closes it). Processes that call as the same
    user share its budget through ``budget_ledger`` (the ledger store); without one, the client
    spends the whole budget (less its reserve) on its own.
    """

    def __init__(
        self,
        *,
        config: DynamicsConfig,
        session: aiohttp.ClientSession | None = None,
        on_request: RequestObserver | None = None,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        read_only: bool = False,
        budget_ledger: BudgetLedger | None = None,
    ) -> None:
        self._config = config
        # a dry run's client: anything but a GET is refused before it is sent
        self._read_only = read_only
        self._root = f"{config.url.rstrip('/')}/api/data/{config.api_version}"
        root_url = URL(self._root)
        self._root_path = root_url.path.rstrip("/")
        self._origin = root_url.origin()
        self._redact = Redactor([config.client_secret.reveal()])
        self._http = VendorHttp.for_user(
            vendor=VENDOR, config=config,
            # service protection counts per user (per web server) of each environment
            calls=config.requests_per_window, window_s=config.window_s,
            bucket=f"dynamics:{config.url}:{config.client_id}",
            errors=dataverse_error, redactor=self._redact, retry=retry,
            on_request=on_request, session=session, budget_ledger=budget_ledger)
        self._token = ClientCredentialsToken(
            http=self._http, token_url=config.token_url, client_id=config.client_id,
            client_secret=config.client_secret, scope=config.scope, clock=clock)
        # the environment's clock as its answers tell it (``Date`` headers, the ``modifiedon``
        # of our own writes), timed: what the account's clock estimate is made of
        self.clock_readings = ClockReadings()

    def __repr__(self) -> str:
        return f"DataverseClient(url={self._config.url!r}, client_id={self._config.client_id!r})"

    # -- transport -------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: URL,
        *,
        endpoint: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
        idempotent: bool = True,
        accept: Callable[[HttpResponse], bool] | None = None,
        reads: bool = False,
    ) -> HttpResponse:
        """``reads``: a POST that only reads (a ``$batch`` of GETs), allowed to a dry run."""
        if self._read_only and method != "GET" and not reads:
            raise WriteRefused(vendor=VENDOR, endpoint=endpoint)
        sent: dict[str, str] = {
            "Accept": "application/json",
            "OData-MaxVersion": "4.0",
            "OData-Version": "4.0",
        }
        if method == "GET":
            sent["If-None-Match"] = "null"
        if body is not None:
            sent["Content-Type"] = content_type
        sent.update(headers or {})
        used: list[str] = []

        async def authorization() -> Mapping[str, str]:
            token = await self._token.bearer()
            used.append(token)
            return {"Authorization": f"Bearer {token}"}

        try:
            response = await self._http.request(method, url, endpoint=endpoint, headers=sent,
                                                auth_headers=authorization, body=body,
                                                idempotent=idempotent, accept=accept)
        except AuthenticationError as exc:
            if exc.status != 401 or not used:
                raise
            # The token was refused (expired early, revoked): renew it once and try again.
            self._token.invalidate(used[-1])
            response = await self._http.request(method, url, endpoint=endpoint, headers=sent,
                                                auth_headers=authorization, body=body,
                                                idempotent=idempotent, accept=accept)
        self._read_clock(response.headers.get("Date"), response, source="date")
        return response

    def _read_clock(self, stamp: str | datetime | None, response: HttpResponse, *,
                    source: str) -> None:
        moment = http_date(stamp) if isinstance(stamp, str) or stamp is None else stamp
        if moment is not None and response.sent_at:
            self.clock_readings.add(ClockReading(vendor_time=moment, resolution_s=1.0,
                                                 sent=response.sent_at,
                                                 received=response.received_at, source=source))

    async def probe_clock(self) -> None:
        """Read the environment's clock once more (the service document's ``Date``)."""
        await self.service_document()

    async def _get_json(self, url: URL, *, endpoint: str,
                        headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        response = await self._send("GET", url, endpoint=endpoint, headers=headers)
        data = decode_json(response)
        if not isinstance(data, dict):
            raise VendorError(vendor=VENDOR, status=response.status, code="",
                              message="expected a JSON object in the response")
        return data

    def _url(self, path: str, params: Mapping[str, str] | None = None) -> URL:
        return encoded_url(f"{self._root}/{_with_query(path.lstrip('/'), params or {})}")

    def _link(self, link: str) -> URL:
        """A vendor paging link, used unchanged; only links to this environment are followed
        (the bearer token goes with them)."""
        url = encoded_url(link)
        if not url.is_absolute():
            url = encoded_url(f"{self._origin}{link if link.startswith('/') else '/' + link}")
        if url.origin() != self._origin:
            raise VendorError(vendor=VENDOR, status=0, code="",
                              message=f"refusing to follow a link to another host ({url.host})")
        return url

    def _endpoint(self, method: str, path: str) -> str:
        """A route template for metrics: keys in parentheses become ``({id})``."""
        bare = path.split("?", 1)[0].strip("/")
        return f"{method} {self._root_path}/{_KEY_SEGMENT.sub('({id})', bare)}"

    # -- reads -----------------------------------------------------------------------------

    async def service_document(self) -> dict[str, Any]:
        """``GET /api/data/v9.2/``: the entity sets the environment exposes."""
        return await self._get_json(encoded_url(self._root + "/"), endpoint=self._endpoint("GET", ""))

    async def get(self, path: str, *, params: Mapping[str, str] | None = None,
                  headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """``GET`` a path relative to the service root (``contacts(<id>)``, ``EntityDefinitions``)."""
        return await self._get_json(self._url(path, params), endpoint=self._endpoint("GET", path),
                                    headers=headers)

    def _page_size(self, page_size: int | None) -> int:
        size = page_size or self._config.page_size
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}, got {size}")
        return size

    async def iter_pages(
        self,
        entity_set: str,
        *,
        select: Sequence[str] | None = None,
        filter: str | None = None,
        orderby: str | None = None,
        expand: str | None = None,
        page_size: int | None = None,
        count: bool = False,
    ) -> AsyncGenerator[Page, None]:
        """Every page of a collection, following ``@odata.nextLink`` exactly as given.

        ``filter`` is an OData expression (build literals with :func:`odata_literal`). The same
        ``Prefer: odata.maxpagesize`` goes with every page; ``$top`` is never sent with it.
        """
        params = _collection_params(select=select, filter=filter, orderby=orderby,
                                    expand=expand, count=count)
        url: URL | None = self._url(entity_set, params)
        async for page in self._pages(url, entity_set=entity_set, page_size=page_size):
            yield page

    def _prefer_pages(self, page_size: int | None) -> dict[str, str]:
        return {"Prefer": f"odata.maxpagesize={self._page_size(page_size)}"}

    async def _pages(self, url: URL | None, *, entity_set: str,
                     page_size: int | None) -> AsyncGenerator[Page, None]:
        prefer = self._prefer_pages(page_size)
        endpoint = self._endpoint("GET", entity_set)
        while url is not None:
            page = _page_of(await self._get_json(url, endpoint=endpoint, headers=prefer))
            yield page
            url = self._link(page.next_link) if page.next_link else None

    async def read_together(self, queries: Sequence[Query]) -> ReadTogether:
        """The first page of each of ``queries``, read in one ``$batch`` request.

        The Web API takes GETs in a batch (outside change sets), and a batch is one request
        towards the service protection limit on requests; the queries' further pages, if any,
        are read with :meth:`rest_of`. Raises the first query's error when one fails.
        """
        operations = [
            BatchOperation(method="GET", path=_with_query(q.entity_set, _collection_params(
                select=q.select, filter=q.filter)), headers=self._prefer_pages(q.page_size))
            for q in queries]
        results, date = await self._batch_once(self._number(operations), change_set=False,
                                               continue_on_error=False)
        pages: list[Page] = []
        for result in results:
            if result.error is not None:
                raise result.error
            if result.body is None:
                raise VendorError(vendor=VENDOR, status=result.status, code="",
                                  message="a batched read answered without a body")
            pages.append(_page_of(result.body))
        return ReadTogether(pages=pages, date=date)

    async def rest_of(self, page: Page, *, entity_set: str,
                      page_size: int | None = None) -> AsyncGenerator[Page, None]:
        """The pages after ``page`` (of a read of ``entity_set``), following its next link."""
        url = self._link(page.next_link) if page.next_link else None
        async for later in self._pages(url, entity_set=entity_set, page_size=page_size):
            yield later

    async def iter_changes(
        self,
        entity_set: str,
        *,
        select: Sequence[str],
        cursor: str | None,
        page_size: int | None = None,
    ) -> AsyncGenerator[DeltaPage, None]:
        """Change tracking: with ``cursor=None`` a full read that ends with a delta link; with a
        saved delta link the changes since; with a saved next link the rest of that read.
        ``select`` shapes the full read; a saved link carries its own.

        Raises :class:`DeltaTokenExpired` when a saved link is refused: start again with
        ``cursor=None``. Save ``page.cursor`` after each page is processed.
        """
        prefer = {"Prefer": f"odata.track-changes,odata.maxpagesize={self._page_size(page_size)}"}
        if cursor is None:
            url = self._url(entity_set, {"$select": ",".join(select)} if select else None)
        else:
            url = self._link(cursor)
        resumed = cursor is not None
        endpoint = self._endpoint("GET", entity_set)
        while True:
            try:
                data = await self._get_json(url, endpoint=endpoint, headers=prefer)
            except DeltaTokenExpired:
                raise
            except VendorError as exc:
                if resumed and 400 <= exc.status < 500 and exc.status not in _NOT_LINK_PROBLEMS:
                    raise DeltaTokenExpired(vendor=VENDOR, status=exc.status, code=exc.code,
                                            message=exc.message) from None
                raise
            rows: list[dict[str, Any]] = []
            deleted: list[str] = []
            for row in data.get("value") or []:
                if _is_deleted_entry(row):
                    deleted.append(str(row.get("id")))
                else:
                    rows.append(row)
            next_link = data.get("@odata.nextLink")
            delta_link = data.get("@odata.deltaLink")
            if not isinstance(next_link, str) or not next_link:
                next_link = None
            if not isinstance(delta_link, str) or not delta_link:
                delta_link = None
            if next_link is None and delta_link is None:
                raise VendorError(vendor=VENDOR, status=200, code="",
                                  message=f"change-tracking read of {entity_set} ended without "
                                          "a delta link (is change tracking enabled?)")
            yield DeltaPage(rows=rows, deleted_ids=deleted, next_link=next_link,
                            delta_link=None if next_link else delta_link)
            if next_link is None:
                return
            url = self._link(next_link)
            resumed = True

    async def get_rows_by_ids(
        self,
        entity_set: str,
        *,
        id_column: str,
        ids: Sequence[str],
        select: Sequence[str],
    ) -> list[dict[str, Any]]:
        """The rows whose ``id_column`` is one of ``ids`` (any order; missing ids are absent).

        The ids go in ``$filter=col eq a or col eq b …`` chunks that keep each URL well under
        the 32 KB limit; chunks are read concurrently within the client's budget.
        """
        unique = list(dict.fromkeys(str(i) for i in ids))
        if not unique:
            return []
        columns = list(select)
        if id_column not in columns:
            columns.append(id_column)

        async def read(expression: str) -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = []
            async for page in self.iter_pages(entity_set, select=columns, filter=expression):
                rows.extend(page.rows)
            return rows

        tasks = [asyncio.ensure_future(read(f)) for f in _chunk_ids(id_column, unique)]
        try:
            chunks = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one chunk failed: the others are not wanted any more
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return [row for chunk in chunks for row in chunk]

    # -- writes ----------------------------------------------------------------------------

    def _write_result(self, entity_set: str, response: HttpResponse) -> WriteResult:
        body = decode_json(response) if response.status != 204 else None
        body = body if isinstance(body, dict) else None
        entity_id, etag = _identity(entity_set, response.headers, body)
        return WriteResult(status=response.status, entity_id=entity_id, etag=etag, body=body)

    async def create(self, entity_set: str, body: Mapping[str, Any], *,
                     return_representation: bool = False,
                     select: Sequence[str] | None = None) -> WriteResult:
        """``POST /<set>``. Not retried after a 5xx or a dropped connection (it might have
        been applied); include the primary key in ``body`` to make a retry safe."""
        headers = {"Prefer": "return=representation"} if return_representation else {}
        params = {"$select": ",".join(select)} if select and return_representation else None
        response = await self._send("POST", self._url(entity_set, params),
                                    endpoint=self._endpoint("POST", entity_set), headers=headers,
                                    body=json_body(body), idempotent=False)
        return self._write_result(entity_set, response)

    async def update(
        self,
        entity_set: str,
        id: str,
        body: Mapping[str, Any],
        *,
        if_match: str | None = "*",
        return_representation: bool = False,
        select: Sequence[str] | None = None,
    ) -> WriteResult:
        """``PATCH /<set>(<id>)``.

        ``if_match="*"`` (default) updates an existing row only (404 ``0x80040217`` if it is
        gone); an etag makes the update conditional (412 ``0x80060882`` if the row changed);
        ``None`` is an upsert.
        """
        headers: dict[str, str] = {}
        if if_match is not None:
            headers["If-Match"] = if_match
        if return_representation:
            headers["Prefer"] = "return=representation"
        path = f"{entity_set}({quote(id, safe=_QUERY_SAFE + '=')})"
        params = {"$select": ",".join(select)} if select and return_representation else None
        response = await self._send("PATCH", self._url(path, params),
                                    endpoint=self._endpoint("PATCH", path), headers=headers,
                                    body=json_body(body))
        return self._write_result(entity_set, response)

    async def delete(self, entity_set: str, id: str, *, if_match: str | None = None) -> None:
        """``DELETE /<set>(<id>)``; 404 ``0x80040217`` when it does not exist."""
        path = f"{entity_set}({quote(id, safe=_QUERY_SAFE + '=')})"
        headers = {"If-Match": if_match} if if_match is not None else {}
        await self._send("DELETE", self._url(path), endpoint=self._endpoint("DELETE", path),
                         headers=headers)

    async def batch(
        self,
        operations: Sequence[BatchOperation],
        *,
        change_set: bool = True,
        continue_on_error: bool = False,
    ) -> list[BatchResult]:
        """Run ``operations`` through ``$batch``; one :class:`BatchResult` per operation, in order.

        At most 1000 operations go in one request (the documented limit); longer lists are
        sent as several batches, so a change set is atomic per 1000 operations.
        ``change_set=True`` makes each batch one atomic change set (no GETs allowed); otherwise
        each operation stands alone and, with ``continue_on_error``, a failure does not stop
        the rest: then the batches do not depend on one another and are sent side by side
        (within the client's concurrency). When a batch fails without ``continue_on_error``,
        later batches are not sent (their results say 424). A 429 for the whole batch waits as
        ``Retry-After`` says and is sent again.
        """
        if not operations:
            return []
        numbered = self._number(operations)
        if change_set and any(op.method.upper() == "GET" for _, op in numbered):
            raise ValueError("GET operations are not allowed inside a change set")
        chunks = [numbered[start:start + MAX_BATCH_PARTS]
                  for start in range(0, len(numbered), MAX_BATCH_PARTS)]
        if continue_on_error and len(chunks) > 1:
            answers = await asyncio.gather(*(
                self._batch_once(chunk, change_set=change_set, continue_on_error=True)
                for chunk in chunks))
            return [result for chunk_results, _ in answers for result in chunk_results]
        results: list[BatchResult] = []
        stopped: str | None = None
        for chunk in chunks:
            if stopped is not None:
                results += [_not_applied(cid, stopped) for cid, _ in chunk]
                continue
            chunk_results, _ = await self._batch_once(chunk, change_set=change_set,
                                                      continue_on_error=continue_on_error)
            results += chunk_results
            failed = next((r for r in chunk_results if r.error is not None and r.status != 424),
                          None)
            if failed is not None and not continue_on_error:
                stopped = f"an earlier batch failed at operation {failed.content_id}"
        return results

    @staticmethod
    def _number(operations: Sequence[BatchOperation]) -> list[tuple[str, BatchOperation]]:
        numbered = [(op.content_id or str(i + 1), op) for i, op in enumerate(operations)]
        ids = [cid for cid, _ in numbered]
        if len(set(ids)) != len(ids):
            raise ValueError("batch operations need distinct content ids")
        return numbered

    async def _batch_once(self, chunk: Sequence[tuple[str, BatchOperation]], *,
                          change_set: bool, continue_on_error: bool
                          ) -> tuple[list[BatchResult], datetime | None]:
        """One ``$batch`` request: a result per operation, and the answer's ``Date``."""
        # one id per batch: its change sets' boundaries derive from it
        boundary = new_boundary("batch")
        payload = encode_batch(chunk, service_root=self._root_path, change_set=change_set,
                               batch_boundary=boundary)
        headers: dict[str, str] = {}
        if continue_on_error:
            headers["Prefer"] = "odata.continue-on-error"
        idempotent = all(op.method.upper() != "POST" for _, op in chunk)
        reads = all(op.method.upper() == "GET" for _, op in chunk)

        def multipart(response: HttpResponse) -> bool:
            return response.content_type == "multipart/mixed" and (
                200 <= response.status < 300 or response.status == 400)

        response = await self._send(
            "POST", self._url("$batch"), endpoint=f"POST {self._root_path}/$batch",
            headers=headers, body=payload, idempotent=idempotent, accept=multipart,
            content_type=f'multipart/mixed; boundary="{boundary}"', reads=reads)
        try:
            parts = decode_batch(response.body, response.headers.get("Content-Type", ""))
        except ValueError as exc:
            raise VendorError(vendor=VENDOR, status=response.status, code="",
                              message=f"unreadable batch response: {exc}") from None
        results = self._match_parts(chunk, parts, change_set=change_set,
                                    stopped=response.status == 400)
        # Our writes were stamped while the batch ran: the newest stamp bounds the clock.
        written = newest_write_stamp(chunk, results)
        if written is not None:
            self._read_clock(written, response, source="write")
        return results, http_date(response.headers.get("Date"))

    def _match_parts(self, chunk: Sequence[tuple[str, BatchOperation]],
                     parts: Sequence[ResponsePart], *, change_set: bool,
                     stopped: bool) -> list[BatchResult]:
        """One result per operation. ``stopped``: the batch halted at a failure (400), so its
        answer may hold only the failing part; operations before it were applied, those after
        it were not."""
        by_id: dict[str, ResponsePart] = {}
        nameless: list[ResponsePart] = []
        failing: ResponsePart | None = None
        for p in parts:
            if p.content_id is None:
                nameless.append(p)
            else:
                by_id[p.content_id] = p
            if failing is None and p.status >= 400:
                failing = p
        if change_set and failing is not None:
            # The change set rolled back: only the failing operation has a response.
            error = self._part_error(failing)
            named = failing.content_id
            return [self._result(cid, op, failing, error=error) if named in (None, cid) else
                    _not_applied(cid, f"change set rolled back: operation {named} failed "
                                      f"({error.status} {error.code or '-'})")
                    for cid, op in chunk]
        unnamed = iter(nameless)
        answered: list[ResponsePart | None] = []
        failed_at: int | None = None
        for cid, op in chunk:
            part = by_id.get(cid)
            if part is None and op.method.upper() == "GET":
                part = next(unnamed, None)
            if failed_at is None and part is not None and part.status >= 400:
                failed_at = len(answered)
            answered.append(part)
        results: list[BatchResult] = []
        for index, ((cid, op), part) in enumerate(zip(chunk, answered, strict=True)):
            if part is not None:
                results.append(self._result(cid, op, part, error=self._part_error(part)
                                            if part.status >= 400 else None))
            elif stopped and failed_at is not None and index < failed_at:
                results.append(_applied_without_answer(cid))
            elif failed_at is not None:
                results.append(_not_applied(cid, f"batch stopped at operation "
                                                 f"{chunk[failed_at][0]}"))
            else:
                results.append(_not_applied(cid, "no response for this operation"))
        return results

    def _part_error(self, part: ResponsePart) -> VendorError:
        response = HttpResponse(part.status, part.headers, part.body)
        return self._redact.error(dataverse_error(response))

    @staticmethod
    def _result(cid: str, op: BatchOperation, part: ResponsePart, *,
                error: VendorError | None) -> BatchResult:
        body = part.json()
        return BatchResult(content_id=cid, status=part.status,
                           body=body if isinstance(body, dict) else None, error=error, part=part,
                           path=op.path)


def newest_write_stamp(chunk: Sequence[tuple[str, BatchOperation]],
                       results: Sequence[BatchResult]) -> datetime | None:
    """The newest ``modifiedon`` among the rows returned by the writes of ``chunk`` that were
    applied (``results``: one per operation, in order), or None.

    Each distinct stamp is read once: a batch's writes share a few seconds. Only text reads
    as a stamp, so other values are left out before."""
    seen = {stamp for result, (_, op) in zip(results, chunk, strict=True)
            if result.ok and result.body is not None and op.method.upper() != "GET"
            and isinstance(stamp := result.body.get("modifiedon"), str)}
    return max((moment for moment in map(parse_stamp, seen) if moment is not None), default=None)


def _applied_without_answer(content_id: str) -> BatchResult:
    # The batch stopped at a later operation and answered only that one: this operation ran
    # (processing is in order) but its own response was not returned.
    return BatchResult(content_id=content_id, status=204, body=None, error=None)


def _not_applied(content_id: str, reason: str) -> BatchResult:
    return BatchResult(
        content_id=content_id, status=424, body=None,
        error=VendorError(vendor=VENDOR, status=424, code="", message=f"not applied: {reason}"))
