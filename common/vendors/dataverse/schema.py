"""The Dataverse tables and columns prefsync reads and writes, and how their values read.

The subscription rows (``psync_marketingpreferencesubscriptions``) link a record (contact, lead
or account) to a preference (``psync_preference``) with a status; the record tables give each
record's email and whether it is active; the marketing lists' member collections say which
records are eligible.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

SUBSCRIPTIONS = "psync_marketingpreferencesubscriptions"
OPTED_IN, OPTED_OUT = 100000000, 100000001
RecordType = Literal["contact", "lead", "account"]
RECORD_TABLES: dict[RecordType, tuple[str, str, str]] = {
    # type: (entity set, primary key, list member collection)
    "contact": ("contacts", "contactid", "listcontact_association"),
    "lead": ("leads", "leadid", "listlead_association"),
    "account": ("accounts", "accountid", "listaccount_association"),
}
LOOKUP_COLUMNS: dict[RecordType, str] = {
    "contact": "_psync_contactid_value",
    "lead": "_psync_leadid_value",
    "account": "_psync_accountid_value",
}
SUBSCRIPTION_COLUMNS = ("psync_marketingpreferencesubscriptionid", "_psync_preferenceid_value",
                        *LOOKUP_COLUMNS.values(), "psync_status", "modifiedon", "versionnumber")

# What a subscription write asks back (``$select`` of its returned representation): the row's
# id (a created row's is new), the status it now holds, its version and stamp. The lookups are
# what the writer wrote; the rest of the row it does not use.
WRITTEN_COLUMNS = ("psync_marketingpreferencesubscriptionid", "psync_status", "versionnumber",
                   "modifiedon")


def parse_odata_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def active_record(record_type: RecordType, row: dict[str, Any]) -> bool:
    # Inactive contacts/accounts (1) and qualified or disqualified leads (1, 2) are read-only.
    return int(row.get("statecode") or 0) == 0
