"""The HTTP exchange both vendor clients build on: one aiohttp session, pacing, retries,
vendor error mapping, credential scrubbing and the per-request observer.

Each client gives it a function that turns a failed response into the vendor's typed error;
everything else (timeouts, 429 waits, 5xx retries, connection errors) is handled here once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp
import orjson
from multidict import CIMultiDictProxy
from yarl import URL

from common.config import VendorCallConfig
from common.vendors.base import (
    Pacer,
    PausedPastDeadline,
    RequestEvent,
    RequestObserver,
    RetryPolicy,
    ThrottledError,
    TransportError,
    VendorError,
    parse_wait,
)
from common.vendors.budget import Budget, BudgetLedger

log = logging.getLogger(__name__)

HeaderSource = Callable[[], Awaitable[Mapping[str, str]]]


class _Sends:
    """How many times aiohttp sent one request. More than once: the kept-alive connection it
    went out on dropped, and aiohttp sent it again on a fresh one by itself (RFC 9112's retry
    of an idempotent request), so the first send may have been applied unanswered."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


async def _count_send(session: aiohttp.ClientSession, context: Any,
                      params: aiohttp.TraceRequestHeadersSentParams) -> None:
    sends = context.trace_request_ctx
    if isinstance(sends, _Sends):
        sends.count += 1


def send_counting() -> aiohttp.TraceConfig:
    """The trace a vendor session needs for :class:`_Sends` (a session passed in to
    :class:`VendorHttp` should carry it, or resends go unseen)."""
    config = aiohttp.TraceConfig()
    config.on_request_headers_sent.append(_count_send)
    return config


@dataclass(frozen=True)
class HttpResponse:
    """A complete vendor response (the body is read before the connection is released)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    # our Unix time just before the request went out and once the answer was read: the
    # vendor's clock, as its answer tells it, was read in between
    sent_at: float = 0.0
    received_at: float = 0.0

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body.strip() else None

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip().lower()


ErrorParser = Callable[[HttpResponse], VendorError]


def encoded_url(url: str) -> URL:
    """A URL used exactly as given: never re-encoded (vendor paging links, pre-encoded paths)."""
    return URL(url, encoded=True)


class Redactor:
    """Removes credentials from text that might reach an exception, a log line or a repr."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = tuple(s for s in secrets if s)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def error(self, exc: VendorError) -> VendorError:
        clean = self(exc.message)
        if clean != exc.message:
            exc.message = clean
            exc.args = (self(str(exc.args[0])) if exc.args else clean,)
        return exc


class VendorHttp:
    """One vendor account's HTTP machinery: the session, its budget and its retries.

    The session is created on first use (inside the running loop) unless one is passed in; a
    session passed in is never closed here (made with :func:`send_counting` among its traces,
    a request aiohttp sent again by itself is known). ``deadline_s`` bounds what one logical request may
    spend waiting (vendor pauses, 429s) and retrying, so that no caller holds its work longer:
    past it the request fails with the last error (see :class:`RetryPolicy`).
    """

    def __init__(
        self,
        *,
        vendor: str,
        timeout_s: float,
        pacer: Pacer,
        retry: RetryPolicy,
        errors: ErrorParser,
        redactor: Redactor,
        on_request: RequestObserver | None = None,
        session: aiohttp.ClientSession | None = None,
        max_connections: int = 16,
        deadline_s: float | None = None,
    ) -> None:
        self.vendor = vendor
        self.deadline_s = deadline_s
        self.pacer = pacer
        self.retry = retry
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._errors = errors
        self._redact = redactor
        self._on_request = on_request
        self._session = session
        self._owns_session = session is None
        self._max_connections = max_connections

    @classmethod
    def for_user(
        cls,
        *,
        vendor: str,
        config: VendorCallConfig,
        calls: int,
        window_s: float,
        bucket: str,
        errors: ErrorParser,
        redactor: Redactor,
        retry: RetryPolicy | None = None,
        on_request: RequestObserver | None = None,
        session: aiohttp.ClientSession | None = None,
        budget_ledger: BudgetLedger | None = None,
    ) -> VendorHttp:
        """The machinery of a client calling as one vendor user: ``calls`` per ``window_s``
        (less the config's reserve), shared through ``budget_ledger`` by every process that
        calls as the same user (``bucket``), at most ``max_concurrency`` calls at once, each
        bounded by the config's timeout and call deadline."""
        return cls(
            vendor=vendor,
            timeout_s=config.timeout_s,
            pacer=Pacer(budget=Budget(calls=calls, window_s=window_s,
                                      reserve=config.budget_reserve),
                        max_concurrency=config.max_concurrency, ledger=budget_ledger,
                        bucket=bucket),
            retry=retry or RetryPolicy(),
            errors=errors,
            redactor=redactor,
            on_request=on_request,
            session=session,
            max_connections=config.max_concurrency,
            deadline_s=config.call_deadline_s,
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if not self._owns_session:
                raise RuntimeError(f"{self.vendor} client: the session passed in is closed")
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                # Affinity cookies are not needed, and a jar would be shared state to leak.
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
                trace_configs=[send_counting()],
            )
        return self._session

    async def close(self) -> None:
        if self._owns_session and self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None if self._owns_session else self._session

    async def request(
        self,
        method: str,
        url: URL,
        *,
        endpoint: str,
        headers: Mapping[str, str] | None = None,
        auth_headers: HeaderSource | None = None,
        body: bytes | None = None,
        idempotent: bool = True,
        paced: bool = True,
        accept: Callable[[HttpResponse], bool] | None = None,
        errors: ErrorParser | None = None,
        send_by: float | None = None,
    ) -> HttpResponse:
        """Send one logical request (retried as the policy says); return the final response.

        A response is returned when ``accept`` says so (by default any 2xx); any other becomes
        the vendor's typed error, built by ``errors`` (by default the client's parser).
        ``auth_headers`` is asked again on every attempt, so a retry picks up a renewed
        credential. ``send_by`` (``time.monotonic()``): no attempt is sent after it; with the
        call's own deadline, the earlier of the two is what a vendor pause or a retry may not
        last past (it raises at once instead).
        """
        accepted = accept or _is_success
        parse = errors or self._errors
        pending_wait = 0.0
        deadline = None if self.deadline_s is None else time.monotonic() + self.deadline_s
        if send_by is not None:
            deadline = send_by if deadline is None else min(deadline, send_by)

        def throttled(wait: float) -> None:
            nonlocal pending_wait
            pending_wait += wait

        async def attempt() -> HttpResponse:
            nonlocal pending_wait
            if paced:
                try:
                    async with self.pacer.slot(deadline=deadline) as paused:
                        waited, pending_wait = pending_wait + paused, 0.0
                        return await self._exchange(method, url, endpoint=endpoint,
                                                    headers=headers, auth_headers=auth_headers,
                                                    body=body, accept=accepted, errors=parse,
                                                    waited=waited)
                except PausedPastDeadline as paused_past:
                    # never sent: the vendor's pause, or the budget's next call, is further
                    # off than this request may wait
                    raise ThrottledError(
                        vendor=self.vendor, status=429, code="",
                        message=f"{endpoint}: no call may go for {paused_past.wait_s:.0f} s "
                                "(a vendor pause or the request budget), past this request's "
                                "deadline",
                        retry_after=paused_past.wait_s) from None
            waited, pending_wait = pending_wait, 0.0
            return await self._exchange(method, url, endpoint=endpoint, headers=headers,
                                        auth_headers=auth_headers, body=body, accept=accepted,
                                        errors=parse, waited=waited)

        return await self.retry.run(attempt, on_throttled=throttled, idempotent=idempotent,
                                    deadline=deadline)

    async def _exchange(
        self,
        method: str,
        url: URL,
        *,
        endpoint: str,
        headers: Mapping[str, str] | None,
        auth_headers: HeaderSource | None,
        body: bytes | None,
        accept: Callable[[HttpResponse], bool],
        errors: ErrorParser,
        waited: float,
    ) -> HttpResponse:
        sent_headers = dict(headers or {})
        if auth_headers is not None:
            sent_headers.update(await auth_headers())
        started = time.monotonic()
        sent_at = time.time()
        sends = _Sends()
        try:
            async with self.session.request(method, url, headers=sent_headers, data=body,
                                            timeout=self._timeout, allow_redirects=False,
                                            trace_request_ctx=sends) as resp:
                payload = await resp.read()
                response = HttpResponse(resp.status, resp.headers, payload, sent_at,
                                        time.time())
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._observe(endpoint, 0, time.monotonic() - started, waited)
            never_sent = isinstance(exc, aiohttp.ClientConnectorError)
            detail = self._redact(f"{endpoint}: {type(exc).__name__}: {exc}".rstrip(": "))
            log.warning("%s request failed: %s", self.vendor, detail)
            # ``from None``: aiohttp's exceptions carry the request headers (credentials).
            raise TransportError(vendor=self.vendor, detail=detail,
                                 maybe_delivered=not never_sent) from None
        self._observe(endpoint, response.status, time.monotonic() - started, waited)
        self._heed_budget_headers(response)
        if accept(response):
            return response
        error = self._redact.error(errors(response))
        # sent again by aiohttp after its connection dropped: the first send may have landed
        error.earlier_maybe_delivered = sends.count > 1
        if isinstance(error, ThrottledError):
            # The whole client waits, not just this request: the budget is the account's.
            wait = error.retry_after if error.retry_after is not None else 1.0
            self.pacer.pause_for(min(wait, self.retry.max_retry_after_s))
        if error.status >= 500 or error.status == 429:
            log.info("%s %s answered %s (%s); retry policy decides", self.vendor, endpoint,
                     error.status, error.code or "-")
        raise error

    def _heed_budget_headers(self, response: HttpResponse) -> None:
        """``X-RateLimit-Remaining``, ``-Reset`` (and ``-Limit``) on an answer: the pacer
        spends what remains of the vendor's window but its reserve; at 0 the next call would be
        refused, so pause until the reset instead of drawing a 429."""
        remaining = response.headers.get("X-RateLimit-Remaining")
        if remaining is None or not remaining.strip().isdigit():
            return
        wait = parse_wait(response.headers.get("X-RateLimit-Reset"))
        limit = response.headers.get("X-RateLimit-Limit", "").strip()
        if wait is not None:
            self.pacer.observe_budget(remaining=int(remaining), reset_s=wait,
                                      limit=int(limit) if limit.isdigit() and limit != "0"
                                      else None)
        if response.status == 429 or remaining.strip() != "0":
            return
        if wait:
            self.pacer.pause_for(min(wait, self.retry.max_retry_after_s))

    def _observe(self, endpoint: str, status: int, seconds: float, waited: float) -> None:
        if self._on_request is None:
            return
        event = RequestEvent(vendor=self.vendor, endpoint=endpoint, status=status,
                             seconds=seconds, throttled_wait_s=waited)
        try:
            self._on_request(event)
        except Exception:  # an observer must never break a request
            log.exception("%s request observer failed", self.vendor)


class VendorClient:
    """What every vendor client is: an async context manager over its :class:`VendorHttp`."""

    _http: VendorHttp

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if the client owns it."""
        await self._http.close()

    @property
    def pacer(self) -> Pacer:
        return self._http.pacer


def _is_success(response: HttpResponse) -> bool:
    return 200 <= response.status < 300


def json_body(value: Any) -> bytes:
    return orjson.dumps(value)


def decode_json(response: HttpResponse) -> Any:
    """The JSON body of a response, or None when it is empty or not JSON."""
    try:
        return response.json()
    except orjson.JSONDecodeError:
        return None
