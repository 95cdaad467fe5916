"""Shared helpers for the client tests: simulators served on loopback, their ``/_sim/``
controls, and a recorder for the clients' request events (no tests here)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import orjson

from common.config import DotdigitalConfig, DynamicsConfig, Secret
from common.vendors.base import RequestEvent
from common.vendors.dotdigital.models import FeedPage
from tests.conftest import serving

TENANT, CLIENT_ID, SECRET = "tenant-a", "client-a", "s3cret-Dataverse-value"
DD_ACCOUNT, DD_USER, DD_PASSWORD = "101", "apiuser-a@apiconnector.com", "pa55word-Alpha!"
DD_OTHER_ACCOUNT, DD_OTHER_USER, DD_OTHER_PASSWORD = "202", "apiuser-b@apiconnector.com", \
    "pa55word-Bravo!"


# A contact of an opt-ins feed: (contact id, email as answered, status, and the (opted in, when
# it changed) of each of its opt-ins to the asked preference).
FeedRow = tuple[int, str, str, list[tuple[bool, datetime]]]


def feed_rows(page: FeedPage) -> list[FeedRow]:
    """A feed page's columns as its contacts, one by one, each with its opt-ins."""
    rows: list[FeedRow] = [(contact_id, email, status, []) for contact_id, email, status
                           in zip(page.contact_ids, page.emails, page.statuses, strict=True)]
    for owner, opted_in, modified in zip(page.owners, page.opted_in, page.modified,
                                         strict=True):
        rows[owner][3].append((opted_in, modified))
    return rows


@dataclass
class Events:
    """Collects every request event a client reports."""

    seen: list[RequestEvent] = field(default_factory=list)

    def __call__(self, event: RequestEvent) -> None:
        self.seen.append(event)

    def statuses(self, endpoint: str | None = None) -> list[int]:
        return [e.status for e in self.seen if endpoint is None or e.endpoint == endpoint]

    @property
    def throttled_wait_s(self) -> float:
        return sum(e.throttled_wait_s for e in self.seen)


def assert_hidden(secrets: tuple[str, ...], *shown: object) -> None:
    """None of ``secrets`` appears in the ``str`` or ``repr`` of anything in ``shown``."""
    for thing in shown:
        for text in (str(thing), repr(thing)):
            for secret in secrets:
                assert secret not in text


@dataclass
class SimControl:
    """The ``/_sim/`` surface of a served simulator."""

    url: str
    session: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        data = orjson.dumps(body) if body is not None else None
        async with self.session.request(method, f"{self.url}/_sim/{path}", data=data) as resp:
            text = await resp.read()
            assert resp.status == 200, text
            return orjson.loads(text) if text else None

    async def seed(self, **body: Any) -> Any:
        return await self.call("POST", "seed", body)

    async def faults(self, **body: Any) -> Any:
        return await self.call("PUT", "faults", body)

    async def clock(self, **body: Any) -> Any:
        return await self.call("PUT", "clock", body)

    async def stats(self) -> dict[str, Any]:
        return dict(await self.call("GET", "stats"))


def dynamics_config(url: str, *, secret: str = SECRET, **overrides: Any) -> DynamicsConfig:
    return DynamicsConfig(url=url, token_url=f"{url}/{TENANT}/oauth2/v2.0/token",
                          client_id=CLIENT_ID, client_secret=Secret(secret),
                          scope=f"{url}/.default", **overrides)


def dotdigital_config(url: str, *, user: str = DD_USER, password: str = DD_PASSWORD,
                      **overrides: Any) -> DotdigitalConfig:
    overrides.setdefault("calls_per_minute", 100_000)
    overrides.setdefault("max_concurrency", 8)
    return DotdigitalConfig(url=url, api_user=user, password=Secret(password), **overrides)


@asynccontextmanager
async def dynamics_sim(**kwargs: Any) -> AsyncIterator[SimControl]:
    from services.simulators.dynamics import DynamicsSimulator

    kwargs.setdefault("clients", [f"{TENANT}:{CLIENT_ID}:{SECRET}"])
    simulator = DynamicsSimulator(**kwargs)
    async with serving(simulator.app) as url, aiohttp.ClientSession() as session:
        yield SimControl(url=url, session=session)


@asynccontextmanager
async def dotdigital_sim(**kwargs: Any) -> AsyncIterator[SimControl]:
    from services.simulators.dotdigital import DotdigitalSimulator

    kwargs.setdefault("accounts", [f"{DD_ACCOUNT}:{DD_USER}:{DD_PASSWORD}",
                                   f"{DD_OTHER_ACCOUNT}:{DD_OTHER_USER}:{DD_OTHER_PASSWORD}"])
    simulator = DotdigitalSimulator(**kwargs)
    async with serving(simulator.app) as url, aiohttp.ClientSession() as session:
        yield SimControl(url=url, session=session)
