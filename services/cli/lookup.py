"""Reading one email's preferences straight from each side (for ``prefsync demo``, the
end-to-end tests and, later, ``prefsync prefs``), through the production clients."""

from __future__ import annotations

from common.vendors.base import VendorError
from common.vendors.dataverse.client import DataverseClient, odata_literal
from common.vendors.dataverse.schema import LOOKUP_COLUMNS, OPTED_IN, OPTED_OUT, RECORD_TABLES, SUBSCRIPTIONS
from common.vendors.dotdigital.client import DotdigitalClient


async def dynamics_preferences(client: DataverseClient, *, email: str,
                               account: str) -> dict[str, dict[int, bool]]:
    """Per Dynamics record id with this email: dotdigital preference id -> opted in."""
    catalog: dict[str, int] = {}
    async for page in client.iter_pages(
            "psync_marketingpreferences",
            select=["psync_marketingpreferenceid", "psync_ecpreferenceid"],
            filter=f"psync_ecaccount eq {odata_literal(account)}"):
        for row in page.rows:
            if row.get("psync_ecpreferenceid") is not None:
                catalog[str(row["psync_marketingpreferenceid"])] = int(row["psync_ecpreferenceid"])
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
                        preference = catalog.get(str(row.get("_psync_preferenceid_value")))
                        if preference is not None and row.get("psync_status") in (OPTED_IN, OPTED_OUT):
                            states[preference] = row["psync_status"] == OPTED_IN
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
