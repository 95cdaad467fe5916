"""Reading one email's preferences straight from each side (for ``prefsync demo``, the
end-to-end tests and, later, ``prefsync prefs``), through the production clients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.vendors.base import VendorError
from common.vendors.dataverse.client import DataverseClient, odata_literal
from common.vendors.dataverse.schema import LOOKUP_COLUMNS, OPTED_IN, OPTED_OUT, RECORD_TABLES, SUBSCRIPTIONS
from common.vendors.dotdigital.client import DotdigitalClient


async def preference_catalog(client: DataverseClient, *, account: str) -> dict[str, int]:
    """The account's preference rows: Dynamics row id -> dotdigital preference id."""
    catalog: dict[str, int] = {}
    async for page in client.iter_pages(
            "psync_marketingpreferences",
            select=["psync_marketingpreferenceid", "psync_ecpreferenceid"],
            filter=f"psync_ecaccount eq {odata_literal(account)}"):
        for row in page.rows:
            if row.get("psync_ecpreferenceid") is not None:
                catalog[str(row["psync_marketingpreferenceid"])] = int(row["psync_ecpreferenceid"])
    return catalog


def subscription_value(row: Mapping[str, Any], catalog: Mapping[str, int]) -> tuple[int, bool] | None:
    """A subscription row's (dotdigital preference id, opted in); None for a row of no
    preference in ``catalog`` or with no status set."""
    preference = catalog.get(str(row.get("_psync_preferenceid_value")))
    if preference is None or row.get("psync_status") not in (OPTED_IN, OPTED_OUT):
        return None
    return preference, row["psync_status"] == OPTED_IN


async def dynamics_preferences(client: DataverseClient, *, email: str,
                               account: str) -> dict[str, dict[int, bool]]:
    """Per Dynamics record id with this email: dotdigital preference id -> opted in."""
    catalog = await preference_catalog(client, account=account)
    found: dict[str, dict[int, bool]] = {}
    for record_type, (entity_set, key, _) in RECORD_TABLES.items():
        async for page in client.iter_pages(entity_set, select=[key],
                                            filter=f"emailaddress1 eq {odata_literal(email)}"):
            for record in page.rows:
                record_id = str(record[key])
                states: dict[int, bool] = {}
                column = LOOKUP_COLUMNS[record_type]
                async for rows in client.iter_pages(
                        SUBSCRIPTIONS, select=["_psync_preferenceid_value", "psync_status"],
                        filter=f"{column} eq {record_id}"):
                    for row in rows.rows:
                        value = subscription_value(row, catalog)
                        if value is not None:
                            states[value[0]] = value[1]
                found[record_id] = states
    return found


async def dotdigital_preferences(client: DotdigitalClient, *, email: str) -> dict[int, bool]:
    """dotdigital preference id -> opted in (never-set preferences are absent)."""
    try:
        opt_ins = await client.subscriptions(email)
    except VendorError as exc:
        if exc.status == 404:
            return {}
        raise
    return {o.preference_id: o.is_opted_in for o in opt_ins.opt_ins}
