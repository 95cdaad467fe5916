"""The sync rules, end to end: the pipeline harness's worlds plus what a Dynamics user or a
dotdigital user does through the vendors' own APIs (records, lists, subscription rows of one
record, the preference tree), and what prefsync shows (status, prefs, history)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.store import open_store
from common.vendors.dataverse.client import DataverseClient, odata_literal
from common.vendors.dataverse.schema import LOOKUP_COLUMNS, OPTED_IN, OPTED_OUT, RECORD_TABLES, SUBSCRIPTIONS
from common.vendors.dotdigital.client import DotdigitalClient
from services.cli.prefs import history_view, preferences_view
from services.runtime.status import account_status

from ..pipeline.conftest import World, make_world

LIST_CODES = {"account": 1, "contact": 2, "lead": 4}


@dataclass
class Vendors:
    """Both vendors as their users change them, through their APIs."""

    world: World
    dataverse: DataverseClient
    dotdigital: DotdigitalClient

    # --- Dynamics ----------------------------------------------------------------------------
    async def create_record(self, record_type: str, email: str) -> str:
        entity_set, key, _ = RECORD_TABLES[record_type]  # type: ignore[index]
        body: dict[str, Any] = {"emailaddress1": email}
        body.update({"name": "Acme"} if record_type == "account" else
                    {"firstname": "Sam", "lastname": "Example"})
        created = await self.dataverse.create(entity_set, body, return_representation=True)
        assert created.body is not None
        return str(created.body[key])

    async def set_record(self, record_type: str, record_id: str, changes: dict[str, Any]) -> None:
        await self.dataverse.update(RECORD_TABLES[record_type][0], record_id,  # type: ignore[index]
                                    changes)

    async def list_id(self, record_type: str) -> str:
        async for page in self.dataverse.iter_pages(
                "lists", select=["listid"],
                filter=f"createdfromcode eq {LIST_CODES[record_type]} "
                       "and psync_emailactivated eq true"):
            for row in page.rows:
                return str(row["listid"])
        raise AssertionError(f"no email-activated list of {record_type}s")

    async def _list_action(self, action: str, record_type: str, record_id: str) -> None:
        list_id = await self.list_id(record_type)
        await self.dataverse.create(f"lists({list_id})/Microsoft.Dynamics.CRM.{action}",
                                    {"EntityId": record_id})

    async def add_to_list(self, record_type: str, record_id: str) -> None:
        await self._list_action("AddMemberList", record_type, record_id)

    async def remove_from_list(self, record_type: str, record_id: str) -> None:
        await self._list_action("RemoveMemberList", record_type, record_id)

    async def preference_row(self, preference_id: int, account: str | None = None) -> dict[str, Any]:
        async for page in self.dataverse.iter_pages(
                "psync_marketingpreferences",
                filter=f"psync_ecaccount eq {odata_literal(account or self.world.account)} "
                       f"and psync_ecpreferenceid eq {preference_id}"):
            for row in page.rows:
                return row
        raise AssertionError(f"no catalog row for preference {preference_id}")

    async def subscribe(self, record_type: str, record_id: str, preference_id: int,
                        opted_in: bool) -> None:
        """Set one record's subscription row, as a user on that record's form would."""
        row_id = (await self.preference_row(preference_id))["psync_marketingpreferenceid"]
        column = LOOKUP_COLUMNS[record_type]  # type: ignore[index]
        status = OPTED_IN if opted_in else OPTED_OUT
        async for page in self.dataverse.iter_pages(
                SUBSCRIPTIONS, select=["psync_marketingpreferencesubscriptionid"],
                filter=f"{column} eq {record_id} and _psync_preferenceid_value eq {row_id}"):
            for row in page.rows:
                await self.dataverse.update(
                    SUBSCRIPTIONS, str(row["psync_marketingpreferencesubscriptionid"]),
                    {"psync_status": status})
                return
        entity_set = RECORD_TABLES[record_type][0]  # type: ignore[index]
        await self.dataverse.create(SUBSCRIPTIONS, {
            "psync_status": status,
            "psync_preferenceid@odata.bind": f"/psync_marketingpreferences({row_id})",
            f"psync_{record_type}id@odata.bind": f"/{entity_set}({record_id})"})

    async def record_values(self, email: str) -> dict[str, dict[int, bool]]:
        return await self.world.dynamics_values(email)

    # --- dotdigital --------------------------------------------------------------------------
    async def set_status(self, email: str, status: str) -> None:
        await self.world.set_status(email, status)


@asynccontextmanager
async def vendors(world: World) -> AsyncIterator[Vendors]:
    account = world.config.account(world.account)
    async with DataverseClient(config=account.dynamics) as dataverse, \
            DotdigitalClient(config=account.dotdigital) as dotdigital:
        yield Vendors(world=world, dataverse=dataverse, dotdigital=dotdigital)


async def synced(world: World) -> dict[str, Any]:
    """A sync that failed nothing."""
    summary = await world.sync()
    assert summary["failed"] == 0, summary
    return summary


async def history(world: World, email: str) -> list[dict[str, Any]]:
    async with open_store(world.config.store.url) as store:
        view = await history_view(store, account=world.account, email=email)
    entries: list[dict[str, Any]] = view["history"]
    return entries


async def prefs(world: World, email: str, wanted: str = "all") -> dict[str, Any]:
    async with open_store(world.config.store.url) as store, \
            DataverseClient(config=world.config.account(world.account).dynamics) as client:
        return await preferences_view(store, account=world.account, email=email,
                                      dataverse=client, wanted=wanted)  # type: ignore[arg-type]


async def status(world: World) -> dict[str, Any]:
    async with open_store(world.config.store.url) as store:
        return await account_status(store, account=world.account,
                                    schedule=world.config.account(world.account).schedule)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with make_world(tmp_path) as w:
        await w.start()
        await synced(w)
        yield w


@pytest.fixture
async def org(world: World) -> AsyncIterator[Vendors]:
    async with vendors(world) as v:
        yield v
