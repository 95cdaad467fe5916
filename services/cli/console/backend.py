"""What the console asks of the rest of prefsync, in one place.

Every page works through :class:`Backend`, which adapts the functions the CLI and the JSON API
already use (status, schedules, sync-now, dead letters, preferences, history, the catalog and
the per-account tokens); the console holds none of their logic. The other console modules import
prefsync only from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from common.config import Config, ConfigError, Secret
from common.domain import normalize_email
from common.messaging.amqp import BrokerUnavailable, connect
from common.messaging.topology import CONTROL_EXCHANGE, Topology
from common.runs import FollowedRuns, RunTracker
from common.schedule import Daily, Every, parse_schedule
from common.store import LedgerStore
from common.vendors.dataverse.catalog import CatalogEntry, entries_of_tree, load_tree
from common.vendors.dataverse.client import DataverseClient
from services.cli.api import ANYONE, ApiAccess, Caller, LiveLookups, LookupLimited, check_bind
from services.cli.dlq import Action, Entry, Walk, walk
from services.cli.prefs import (
    CALLER,
    DECISIONS,
    FILTERS,
    Filter,
    add_api_routes,
    api_resources,
    history_view,
    preferences_view,
)
from services.cli.schedule import wake_dynamics_poller
from services.cli.sync_now import request_sync
from services.runtime.schedules import (
    effective_schedule,
    next_run,
    set_schedule,
    stored_schedule,
)
from services.runtime.status import account_status, run_counts

__all__ = [
    "ANYONE", "CALLER", "CONTROL_EXCHANGE", "DECISIONS", "FILTERS", "ApiAccess", "Backend",
    "BrokerUnavailable", "Caller", "CatalogEntry", "Config", "ConfigError", "Daily",
    "DeadLetters", "Entry", "Every", "Filter", "FollowedRuns", "RunTracker", "ScheduleInfo",
    "Secret", "Topology", "Walk",
    "add_api_routes", "check_bind", "normalize_email", "open_backend", "parse_schedule",
    "run_counts",
]

log = logging.getLogger("prefsync.console")

# Beyond this many dead letters the page shows the count only: each listing walks the queue.
DEAD_LETTERS_LISTED = 500
BROKER_RETRY_S = 5.0
# A page waits this long for the live contact-method lookup (the Dataverse client would keep
# retrying an outage for minutes): the rest of the page does not depend on it.
LOOKUP_WAIT_S = 10.0


@dataclass(frozen=True, kw_only=True)
class ScheduleInfo:
    in_force: str
    override: str | None    # set from the console or `prefsync schedule`; None: the config's
    configured: str
    next_run_at: datetime | None


@dataclass(frozen=True, kw_only=True)
class DeadLetters:
    """An account's dead letters as the page lists them; ``entries`` None: not listed (too many,
    or the broker is unreachable: ``problem`` says which)."""

    count: int
    entries: list[Entry] | None
    problem: str = ""


@dataclass
class BrokerLink:
    """The console's broker connection, (re)tried in the background so that the read-only pages
    serve while the broker is down."""

    url: str
    connection: AbstractRobustConnection | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def keep_open(self) -> None:
        while self.connection is None:
            try:
                self.connection = await connect(self.url, name="prefsync-console")
            except BrokerUnavailable as exc:
                log.warning("the console cannot reach the broker yet; retrying",
                            extra={"error": str(exc)})
                await asyncio.sleep(BROKER_RETRY_S)
        self.ready.set()


class Backend:
    """The config, the open store, the API's Dataverse clients and the broker connection."""

    def __init__(self, *, config: Config, store: LedgerStore, dataverse: dict[str, DataverseClient],
                 access: ApiAccess, broker: BrokerLink) -> None:
        self.config = config
        self.store = store
        self.dataverse = dataverse
        self.access = access
        self.broker = broker
        self.lookups = LiveLookups(clients=dataverse,
                                   per_minute=config.api.lookups_per_minute)
        # one walk of a dead-letter queue at a time: two walks would hide entries from each other
        self._dlq_locks: dict[str, asyncio.Lock] = {}

    # --- accounts and who sees them ---------------------------------------------------------
    @property
    def account_ids(self) -> list[str]:
        return [a.id for a in self.config.accounts]

    def visible(self, caller: Caller) -> list[str]:
        return [a for a in self.account_ids if caller.may_read(a)]

    def may_see(self, caller: Caller, account: str) -> bool:
        return account in self.account_ids and caller.may_read(account)

    # --- status and schedules ------------------------------------------------------------
    async def status(self, account: str) -> dict[str, Any]:
        return await account_status(self.store, account=account,
                                    schedule=self.config.account(account).schedule)

    async def schedule(self, account: str) -> ScheduleInfo:
        configured = self.config.account(account).schedule
        return ScheduleInfo(
            in_force=str(await effective_schedule(self.store, account, configured=configured)),
            override=await stored_schedule(self.store, account), configured=configured,
            next_run_at=await next_run(self.store, account, configured=configured))

    async def save_schedule(self, account: str, text: str | None) -> bool:
        """Store the override (``ValueError`` for a bad one; None: back to the config's) and
        wake the dynamics-poller; False: saved, but the poller could not be woken (it reads
        the store again within its regular look)."""
        await set_schedule(self.store, account, text)
        try:
            await wake_dynamics_poller(config=self.config, account=account)
        except (BrokerUnavailable, aio_pika.exceptions.AMQPException) as exc:
            log.warning("schedule saved; the dynamics-poller was not woken",
                        extra={"account": account, "error": str(exc)})
            return False
        return True

    async def sync_now(self, account: str) -> str:
        """Start a run; returns the trigger's id (``BrokerUnavailable`` when it cannot)."""
        try:
            return await request_sync(config=self.config, account=account)
        except aio_pika.exceptions.AMQPException as exc:
            raise BrokerUnavailable(str(exc)) from None

    # --- the catalog ---------------------------------------------------------------------
    async def catalog(self, account: str) -> list[CatalogEntry]:
        """dotdigital's preference tree as the sync last read it, in dotdigital's order."""
        return entries_of_tree(await load_tree(self.store, account))

    # --- dead letters --------------------------------------------------------------------
    async def _dead_letter_count(self, connection: AbstractRobustConnection,
                                 account: str) -> int | None:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(Topology.dead_letter_queue(account), passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return queue.declaration_result.message_count or 0

    async def dead_letters(self, account: str) -> DeadLetters:
        connection = self.broker.connection
        if connection is None:
            return DeadLetters(count=0, entries=None, problem="the broker is unreachable")
        try:
            count = await self._dead_letter_count(connection, account)
            if count is None:
                return DeadLetters(count=0, entries=[])  # no service has started for it yet
            if count > DEAD_LETTERS_LISTED:
                return DeadLetters(count=count, entries=None, problem=(
                    f"more than {DEAD_LETTERS_LISTED}: list them with "
                    f"`prefsync dlq list --account {account}`"))
            result = await self._walk(account, action="list")
        except aio_pika.exceptions.AMQPException as exc:
            return DeadLetters(count=0, entries=None, problem=f"the broker: {exc}")
        return DeadLetters(count=len(result.entries), entries=result.entries)

    async def replay_dead_letters(self, account: str, ids: Sequence[str]) -> Walk:
        """Replay the entries with these message ids (none given: every entry)."""
        return await self._walk(account, action="replay", ids=ids)

    async def purge_dead_letters(self, account: str, ids: Sequence[str]) -> Walk:
        return await self._walk(account, action="purge", ids=ids)

    async def _walk(self, account: str, *, action: Action, ids: Sequence[str] = ()) -> Walk:
        connection = self.broker.connection
        if connection is None:
            raise BrokerUnavailable("the broker is unreachable")
        async with self._dlq_locks.setdefault(account, asyncio.Lock()):
            return await walk(connection, accounts=[account], action=action, ids=ids)

    # --- one email -------------------------------------------------------------------------
    async def preferences(self, caller: Caller, *, account: str, email: str,
                          wanted: Filter) -> tuple[dict[str, Any], str]:
        """The preferences view and, when the contact methods could not be read, why."""
        problem = ""

        async def lookup(address: str) -> list[dict[str, Any]] | None:
            nonlocal problem
            try:
                async with asyncio.timeout(LOOKUP_WAIT_S):
                    return await self.lookups.contact_methods(caller, account=account,
                                                              email=address)
            except LookupLimited as exc:
                problem = f"Too many live lookups for now; try again in {exc.retry_after_s:.0f} s."
            except Exception as exc:  # a Dataverse outage must not take the page down
                log.warning("contact methods lookup failed",
                            extra={"account": account, "error": type(exc).__name__})
                problem = "Dynamics could not be reached for the contact methods."
            return None

        view = await preferences_view(self.store, account=account, email=email, wanted=wanted,
                                      lookup=lookup)
        return view, problem

    async def history(self, account: str, email: str) -> dict[str, Any]:
        return await history_view(self.store, account=account, email=email)


@asynccontextmanager
async def open_backend(config: Config, *, admin_token: Secret | None = None
                       ) -> AsyncIterator[Backend]:
    """The backend, open for the console's lifetime: the store, one Dataverse client per
    account (paced to the API's share of its budget), the broker connection in the
    background."""
    async with AsyncExitStack() as stack:
        store, clients = await stack.enter_async_context(api_resources(config))
        broker = BrokerLink(url=config.broker.url)
        opener = asyncio.create_task(broker.keep_open())

        async def close_broker() -> None:
            opener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await opener
            if broker.connection is not None:
                with contextlib.suppress(Exception):
                    await broker.connection.close()

        stack.push_async_callback(close_broker)
        yield Backend(config=config, store=store, dataverse=clients,
                      access=ApiAccess(config=config, admin_token=admin_token), broker=broker)
