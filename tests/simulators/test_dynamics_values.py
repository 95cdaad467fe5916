"""Dataverse simulator: the values a write may give each kind of column (``Writes._coerce``).

The rule read off each column is kept per column; these pin what it accepts and refuses,
with the platform's error codes and messages.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.simulators.dynamics.protocol import QUERY_ERROR, VALIDATION_ERROR, ApiError
from services.simulators.dynamics.schema import TABLES
from services.simulators.dynamics.store import Store
from services.simulators.dynamics.writes import Writes

CONTACTS = TABLES["contacts"]
SUBSCRIPTIONS = TABLES["psync_marketingpreferencesubscriptions"]
GUID = "2ad053cf-ffbc-d965-71c6-9db5a6f0df4b"


def _coerce(table: str, column: str, value: Any) -> Any:
    schema = TABLES[table]
    writes = Writes(Store(), lambda: datetime(2026, 12, 4, tzinfo=UTC))
    return writes._coerce(schema, schema.columns[column], value)


@pytest.mark.parametrize(("table", "column", "value", "kept"), [
    ("contacts", "lastname", "Smith", "Smith"),
    ("contacts", "lastname", None, None),
    ("contacts", "donotemail", True, True),
    ("psync_marketingpreferencesubscriptions", "psync_status", 100000001, 100000001),
    ("contacts", "statecode", 7, 7),  # state and status are checked with the row, not here
    ("contacts", "contactid", GUID.upper(), GUID),
])
def test_accepted_values(table: str, column: str, value: Any, kept: Any) -> None:
    assert _coerce(table, column, value) == kept


@pytest.mark.parametrize(("table", "column", "value", "code", "message"), [
    ("contacts", "lastname", 5, QUERY_ERROR,
     "Cannot convert the literal '5' to the expected type 'Edm.String'."),
    ("contacts", "donotemail", 1, QUERY_ERROR,
     "Cannot convert the literal '1' to the expected type 'Edm.Boolean'."),
    ("psync_marketingpreferencesubscriptions", "psync_status", True, QUERY_ERROR,
     "Cannot convert the literal 'True' to the expected type 'Edm.Int32'."),
    ("contacts", "createdon", "2026-01-01T00:00:00Z", QUERY_ERROR,
     "Cannot convert the literal '2026-01-01T00:00:00Z' to the expected type "
     "'Edm.DateTimeOffset'."),
    ("contacts", "contactid", "not-a-guid", QUERY_ERROR,
     "Unrecognized 'Edm.Guid' literal 'not-a-guid'."),
    ("psync_marketingpreferencesubscriptions", "psync_status", 3, VALIDATION_ERROR,
     "A validation error occurred.  The value 3 of 'psync_status' on record of type "
     "'psync_marketingpreferencesubscription' is outside the valid range. Accepted Values: "
     "100000000,100000001"),
])
def test_refused_values(table: str, column: str, value: Any, code: str, message: str) -> None:
    with pytest.raises(ApiError) as refused:
        _coerce(table, column, value)
    assert (refused.value.status, refused.value.code, refused.value.message) == (400, code, message)


def test_too_long_a_text_is_refused() -> None:
    column = next(c for c in CONTACTS.columns.values() if c.max_length is not None)
    assert column.max_length is not None
    with pytest.raises(ApiError) as refused:
        _coerce("contacts", column.name, "x" * (column.max_length + 1))
    assert refused.value.code == VALIDATION_ERROR
    assert f"exceeded the maximum allowed length of '{column.max_length}'" in refused.value.message
