"""Creating, updating and deleting rows, and marketing-list membership, with Dataverse's rules.

Every write takes the next value of the one global version counter and stamps ``modifiedon``
from the simulator clock, truncated to whole seconds. ``createdon``, ``modifiedon``,
``versionnumber`` and ``fullname`` are read-only: values sent for them are ignored.

Rules enforced here:

- Inactive contacts and accounts (statecode 1) and qualified or disqualified leads (statecode 1
  or 2) are read-only until reactivated: an update that doesn't set an active ``statecode`` is
  refused with ``0x80040203`` (status 400; the real code and message are not documented, so
  this is inferred).
- Our solution's rules for ``psync_marketingpreferencesubscription`` (a plug-in in the real
  solution, so ``0x80040265``): a row refers to exactly one contact, lead or account and to one
  preference, carries a valid ``psync_status``, and may not be created, changed or deleted while
  the record it belongs to is read-only (inactive, qualified or disqualified) — the solution
  does not let preferences of read-only records be edited. (record, preference) is an alternate
  key: a second row for the same pair is refused with DuplicateRecord ``0x80040237`` (412).
- Deleting a contact, lead or account deletes its subscription rows and list memberships;
  deleting a preference deletes its subscription rows (parental cascades, which bypass the
  plug-in rule as the platform's cascades do).
- A marketing list's members must be of the list's ``createdfromcode`` type. Each membership
  is a ``listmember`` row (created on, version), made and removed with it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from time import time as _system_time
from typing import Any, NamedTuple

from ..base import SimClock
from .protocol import (
    DUPLICATE_RECORD,
    INVALID_ARGUMENT,
    PLUGIN_ERROR,
    VALIDATION_ERROR,
    ApiError,
    new_guid,
    not_found,
    query_error,
)
from .schema import (
    LIST_MEMBER_TYPES,
    MANY_TO_MANY,
    SUBSCRIPTION_RECORD_LOOKUPS,
    SUBSCRIPTIONS,
    TABLES,
    Column,
    Kind,
    TableSchema,
)
from .store import Row, Store, Table, listmember_row

_CANONICAL_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_REF = re.compile(r"(?:^|/)([A-Za-z_][A-Za-z0-9_]*)\(([0-9A-Fa-f-]{36})\)$")
_DEFAULT_FALSE = ("donotbulkemail", "donotemail", "type", "psync_emailactivated",
                  "psync_ispublic", "psync_iscategory")
# A subscription's record lookups: (navigation property, its value column, the target table).
_RECORD_COLUMNS = tuple((nav, f"_{nav}_value", TABLES[SUBSCRIPTIONS.lookups[nav].target])
                        for nav in SUBSCRIPTION_RECORD_LOOKUPS)
_RECORD_VALUE_COLUMNS = tuple(column for _, column, _ in _RECORD_COLUMNS)
_CONTACT, _LEAD, _ACCOUNT = _RECORD_VALUE_COLUMNS
_PREFERENCE = "_psync_preferenceid_value"
# (the alternate key is the record lookups, then the preference: _check_subscription builds it)
assert SUBSCRIPTIONS.unique == (*_RECORD_VALUE_COLUMNS, _PREFERENCE)
_ONE_SECOND = timedelta(seconds=1)
# A usual subscription write's body keys (usual_create): its status, its preference bound and
# one record bound (each with its value column, target table and place in the alternate key).
_STATUS = "psync_status"
_STATUS_COLUMN = SUBSCRIPTIONS.columns[_STATUS]
_PREFERENCE_BIND = "psync_preferenceid@odata.bind"
_PREFERENCE_SET = SUBSCRIPTIONS.lookups["psync_preferenceid"].target
# (_settle_state's one change to a row of a table without ``fullname``: none, so skipped there)
assert "fullname" not in SUBSCRIPTIONS.columns
_RECORD_BINDS = tuple((f"{nav}@odata.bind", column, target, place)
                      for place, (nav, column, target) in enumerate(_RECORD_COLUMNS))
assert len(_RECORD_BINDS) == 3  # (usual_create lays out the alternate key for three)
_SUBSCRIPTIONS_SET, _SUBSCRIPTION_PK = SUBSCRIPTIONS.entity_set, SUBSCRIPTIONS.pk


def parse_guid(text: str) -> str:
    if _CANONICAL_GUID.fullmatch(text):  # already as str(UUID) writes it: nothing to do
        return text
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise query_error(f"Unrecognized 'Edm.Guid' literal '{text}'.") from None


# Valid references already read: a batch binds the same few rows (its preferences) over and
# over, and each record once per preference, which can be a whole table of records apart (the
# states of one preference come together): enough are kept for a large table's records.
_REFS: dict[str, tuple[str, str]] = {}
_REFS_KEPT = 1 << 16


def parse_ref(value: Any) -> tuple[str, str]:
    """``(entity set, id)`` from an ``@odata.bind`` / ``@odata.id`` value (relative or absolute)."""
    if isinstance(value, str):
        known = _REFS.get(value)
        if known is not None:
            return known
    ref = _parse_ref(value)
    if len(_REFS) >= _REFS_KEPT:
        _REFS.clear()
    _REFS[value] = ref
    return ref


def _parse_ref(value: Any) -> tuple[str, str]:
    if not isinstance(value, str):
        raise query_error("An entity reference must be a string URL such as '/contacts(<id>)'.")
    m = _REF.search(value.split("?")[0])
    if m is None:
        raise query_error(f"The URL '{value}' is not a valid entity reference.")
    return m.group(1), parse_guid(m.group(2))


# The JSON value type each column kind takes, and kinds by name: an enum member look-up
# costs several times a global's, and these run for every value written.
_VALUE_TYPES: dict[Kind, type] = {Kind.STRING: str, Kind.BOOL: bool, Kind.INT: int,
                                  Kind.BIGINT: int, Kind.CHOICE: int, Kind.GUID: str}
_GUID, _CHOICE, _LOOKUP = Kind.GUID, Kind.CHOICE, Kind.LOOKUP


class _ValueRule(NamedTuple):
    """What a column accepts, read off it once (hashing an enum member, as a look-up by kind
    does, costs more than the whole check)."""

    column: Column
    wanted: type | None  # the JSON value type; None: no value is accepted
    guid: bool
    choices: frozenset[int] | None  # the accepted values of a checked choice column


_VALUE_RULES: dict[int, _ValueRule] = {}


def _value_rule(col: Column) -> _ValueRule:
    known = _VALUE_RULES.get(id(col))
    if known is not None and known.column is col:
        return known
    checked = (col.kind is _CHOICE and bool(col.choices)
               and col.name not in ("statecode", "statuscode"))
    rule = _VALUE_RULES[id(col)] = _ValueRule(
        col, _VALUE_TYPES.get(col.kind), col.kind is _GUID,
        frozenset(c for c, _ in col.choices) if checked else None)
    return rule


# the statuses a subscription accepts (None: any), read once for its usual writes
_STATUS_CHOICES = _value_rule(_STATUS_COLUMN).choices


# How a table reads each key of a body (what _key_plan answers): its value's column rule, a
# lookup bound, or nothing (annotations, read-only columns).
_VALUE, _BIND, _SKIP = "value", "bind", "skip"
_BIND_SUFFIX = "@odata.bind"
KeyPlan = tuple[str, Any]
# Plans by table and key: bodies repeat a few keys over and over. Refused keys are not kept.
_KEY_PLANS: dict[tuple[str, str], tuple[TableSchema, KeyPlan]] = {}
_KEY_PLANS_KEPT = 4096


def _key_plan(schema: TableSchema, key: str) -> KeyPlan:
    """How ``schema`` reads a body's ``key``; the error a key it refuses gets."""
    known = _KEY_PLANS.get((schema.entity_set, key))
    if known is not None and known[0] is schema:
        return known[1]
    plan: KeyPlan
    if key.endswith(_BIND_SUFFIX):
        nav = key[: -len(_BIND_SUFFIX)]
        lookup = schema.lookups.get(nav)
        if lookup is None:
            raise query_error(
                f"An undeclared property '{nav}' which only has property annotations in "
                "the payload but no property value was found in the payload. In OData, "
                "only declared navigation properties and declared named streams can be "
                "represented as properties without values.")
        plan = (_BIND, lookup)
    elif key.startswith("@odata.") or "@" in key:
        plan = (_SKIP, None)  # annotations such as @odata.type
    else:
        col = schema.columns.get(key)
        if col is None:
            raise query_error(
                f"The property '{key}' does not exist on type '{schema.type_name}'. Make sure "
                "to only use property names that are defined by the type.")
        if col.kind is _LOOKUP:
            raise query_error("CRM do not support direct update of Entity Reference "
                              "properties, Use Navigation properties instead.")
        plan = (_SKIP, None) if col.read_only else (_VALUE, _value_rule(col))
    if len(_KEY_PLANS) >= _KEY_PLANS_KEPT:
        _KEY_PLANS.clear()
    _KEY_PLANS[(schema.entity_set, key)] = (schema, plan)
    return plan


_BLANK_ROWS: dict[str, tuple[TableSchema, Row]] = {}


def _blank_row(schema: TableSchema) -> Row:
    """A new row of ``schema`` before the body's values: every column null but the defaults
    (built once per table; callers copy it)."""
    known = _BLANK_ROWS.get(schema.entity_set)
    if known is not None and known[0] is schema:
        return known[1]
    row: Row = dict.fromkeys(schema.columns)
    for col in _DEFAULT_FALSE:
        if col in row:
            row[col] = False
    row["statecode"] = 0
    row["statuscode"] = schema.default_status(0)
    _BLANK_ROWS[schema.entity_set] = (schema, row)
    return row


_BLANK_SUBSCRIPTION = _blank_row(SUBSCRIPTIONS)  # (for usual_create: never changed, copied)

def _validation(message: str) -> ApiError:
    return ApiError(400, VALIDATION_ERROR, f"A validation error occurred.  {message}")


class Writes:
    def __init__(self, store: Store, now: Callable[[], datetime],
                 on_write: Callable[[], None] = lambda: None, *,
                 clock: SimClock | None = None) -> None:
        """``clock``: the simulator's clock, when ``now`` is its reading."""
        self.store = store
        self.now = now
        self._clock = clock
        self._second: datetime | None = None  # the last whole second stamped (_stamp_time)
        self._next = datetime.min  # the second after it
        # the POSIX times the last second stamped runs from and to (_stamp_time)
        self._span = (0.0, 0.0)
        self.on_write = on_write
        # a subscription's usual create and status update take their own path (tests turn it
        # off to hold it to the general one)
        self.usual_paths = True
        # told of every row created or updated (the ``/_sim/journal``)
        self.on_row: Callable[[TableSchema, Row], None] | None = None

    # -- body ------------------------------------------------------------------------------------

    def _coerce(self, schema: TableSchema, col: Column, value: Any) -> Any:
        return None if value is None else self._coerce_by(schema, _value_rule(col), value)

    def _coerce_by(self, schema: TableSchema, rule: _ValueRule, value: Any) -> Any:
        """_coerce of a value that is not None, by its column's rule."""
        col, wanted, guid, choices = rule
        ok = (wanted is not None and isinstance(value, wanted)
              and (wanted is not int or not isinstance(value, bool)))  # a bool is no number
        if not ok:
            raise query_error(f"Cannot convert the literal '{value}' to the expected type "
                              f"'{col.kind.edm}'.")
        if guid:
            return parse_guid(value)
        if col.max_length is not None and len(value) > col.max_length:
            raise _validation(f"The length of the '{col.name}' attribute of the '{schema.logical}' "
                              f"entity exceeded the maximum allowed length of '{col.max_length}'.")
        if choices is not None and value not in choices:
            accepted = [c for c, _ in col.choices]
            raise _validation(
                f"The value {value} of '{col.name}' on record of type '{schema.logical}' is "
                f"outside the valid range. Accepted Values: {','.join(map(str, accepted))}")
        return value

    def _changes(self, schema: TableSchema, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise query_error("The request body must be a JSON object.")
        changes: dict[str, Any] = {}
        for key, value in body.items():
            kind, item = _key_plan(schema, key)
            if kind is _VALUE:
                changes[key] = None if value is None else self._coerce_by(schema, item, value)
            elif kind is _BIND:
                if value is None:
                    changes[item.column] = None
                    continue
                target_set, target_id = parse_ref(value)
                if target_set != item.target:
                    raise query_error(f"The entity set '{target_set}' is not valid for the "
                                      f"navigation property '{key[:-len(_BIND_SUFFIX)]}'; "
                                      f"expected '{item.target}'.")
                if target_id not in self.store.tables[target_set].rows:
                    raise not_found(TABLES[target_set].logical, target_id)
                changes[item.column] = target_id
        return changes

    def _stamp_time(self) -> datetime:
        """The clock truncated to whole seconds, as writes stamp rows: the same object all
        through a second (cheaper than truncating each reading, and the ``modifiedon`` index
        compares equal stamps by identity).

        While the simulator's clock runs neither frozen nor shifted, its reading is the
        system time's in UTC: a system time within the last second stamped is that second
        (read as a float, it costs a fraction of a datetime)."""
        clock = self._clock
        if clock is not None and clock.is_system_time:
            start, end = self._span
            if start <= _system_time() < end:
                assert self._second is not None  # (the span is empty until one is stamped)
                return self._second
        now = self.now()
        second = self._second
        # (two comparisons: cheaper than the difference's timedelta)
        if second is not None and now.tzinfo is second.tzinfo and second <= now < self._next:
            return second
        second = self._second = now.replace(microsecond=0)
        self._next = second + _ONE_SECOND
        if clock is not None:
            start = second.timestamp()
            self._span = (start, start + 1.0)
        return second

    def _settle_state(self, schema: TableSchema, row: Row, changes: dict[str, Any],
                      row_id: str) -> None:
        state, status = changes.get("statecode"), changes.get("statuscode")
        if "statecode" in changes and "statuscode" not in changes and state in schema.states:
            row["statuscode"] = schema.default_status(state)
        elif "statuscode" in changes and "statecode" not in changes and status is not None:
            for s, codes in schema.states.items():
                if status in codes:
                    row["statecode"] = s
        state, status = row.get("statecode"), row.get("statuscode")
        if state not in schema.states:
            raise _validation(f"The value {state} of 'statecode' on record of type "
                              f"'{schema.logical}' is outside the valid range.")
        if status not in schema.states[state]:
            raise ApiError(400, INVALID_ARGUMENT,
                           f"{status} is not a valid status code for state code {state} on "
                           f"{schema.logical} with Id {row_id}.")
        if "fullname" in schema.columns:
            full = " ".join(p for p in (row.get("firstname"), row.get("lastname")) if p)
            row["fullname"] = full or None

    # -- rows ------------------------------------------------------------------------------------

    def create(self, schema: TableSchema, body: Any, *, row_id: str | None = None,
               usual: bool = True) -> Row:
        """``usual=False``: the usual path was tried already (usual_create answered None)."""
        if usual and schema is SUBSCRIPTIONS and row_id is None:
            made = self.usual_create(body)
            if made is not None:
                return made
        changes = self._changes(schema, body)
        given = changes.pop(schema.pk, None)
        row_id = row_id or given or new_guid()
        table = self.store.tables[schema.entity_set]
        if row_id in table.rows:
            raise ApiError(412, DUPLICATE_RECORD, "A record with matching key values already exists.")
        row: Row = _blank_row(schema).copy()
        row[schema.pk] = row_id
        row.update(changes)
        self._settle_state(schema, row, changes, row_id)
        # one clock reading: a new row's createdon and modifiedon are the same instant
        row["createdon"] = created = self._stamp_time()
        return self._save(schema, row_id, row, old=None, at=created)

    def update(self, schema: TableSchema, row_id: str, body: Any) -> Row:
        if schema is SUBSCRIPTIONS and self.usual_paths:
            updated = self._usual_update(row_id, body)
            if updated is not None:
                return updated
        table = self.store.tables[schema.entity_set]
        old = table.rows.get(row_id)
        if old is None:
            raise not_found(schema.logical, row_id)
        changes = self._changes(schema, body)
        changes.pop(schema.pk, None)
        if (old.get("statecode") in schema.read_only_states
                and changes.get("statecode", old.get("statecode")) in schema.read_only_states):
            raise ApiError(400, INVALID_ARGUMENT,
                           f"The {schema.logical} with Id = {row_id} is read-only because of its "
                           f"state (statecode {old.get('statecode')}); reactivate it before "
                           "editing it.")
        row = dict(old)
        row.update(changes)
        self._settle_state(schema, row, changes, row_id)
        return self._save(schema, row_id, row, old=old, at=None)

    def _save(self, schema: TableSchema, row_id: str, row: Row, *, old: Row | None,
              at: datetime | None) -> Row:
        """Check a created (``old`` None) or updated row, stamp it, store it and tell of it."""
        # (the alternate key the check computed is the one the store files the row under:
        # stamping changes no key column)
        return self._keep(schema, row_id, row, unique=self._check(schema, row, old), at=at)

    def _keep(self, schema: TableSchema, row_id: str, row: Row, *,
              unique: tuple[Any, ...] | None, at: datetime | None,
              new_in: Table | None = None) -> Row:
        """Stamp a checked row (``at``: its ``modifiedon`` when the caller read the clock
        already), store it (``unique``: its alternate key; ``new_in``: its table, when the
        caller knows no row has its id there) and tell of it."""
        row["versionnumber"] = self.store.next_version()
        row["modifiedon"] = at or self._stamp_time()
        if new_in is None:
            self.store.put(schema.entity_set, row_id, row, unique)
        else:
            self.store.put_new(new_in, row_id, row, unique)
        self.on_write()
        if self.on_row is not None:
            self.on_row(schema, row)
        return row

    # -- a subscription's usual writes -----------------------------------------------------------

    def usual_create(self, body: Any) -> Row | None:
        """create of a subscription as clients send it: the body holds its status, its
        preference bound and one record bound, nothing else. The row made when every rule
        holds; else None, and nothing done: the general path then answers (and refuses) it.
        None when the usual paths are off. Nothing it does can fail half done (it needs no
        change set to undo it).

        1. The status is an accepted choice (an int, not a bool).
        2. Each binding is a valid reference into the lookup's table, to a row that exists,
           not starting with ``$`` (as a reference to an operation of its change set does:
           ``$batch`` resolves those before a create sees them).
        3. The record is not read-only; no row holds the (record, preference) key yet.
        4. The row is filled, stamped and stored as the general path does it.
        """
        if type(body) is not dict or len(body) != 3 or not self.usual_paths:
            return None
        status, preference = body.get(_STATUS), body.get(_PREFERENCE_BIND)
        choices = _STATUS_CHOICES
        if (type(status) is not int or (choices is not None and status not in choices)
                or type(preference) is not str):
            return None
        for binding in _RECORD_BINDS:
            record = body.get(binding[0])
            if record is not None:
                break
        else:
            return None
        if type(record) is not str:
            return None
        _, column, target, place = binding
        try:  # (parse_ref's look among the references read already, inline)
            preference_set, preference_id = _REFS.get(preference) or parse_ref(preference)
            record_set, record_id = _REFS.get(record) or parse_ref(record)
        except ApiError:
            return None
        tables = self.store.tables
        held = tables[record_set].rows.get(record_id)
        if (preference_set != _PREFERENCE_SET or record_set != target.entity_set
                or preference[0] == "$" or record[0] == "$"  # (valid references: not empty)
                or preference_id not in tables[preference_set].rows or held is None
                or held.get("statecode") in target.read_only_states):
            return None
        # the alternate key as _check_subscription builds it: the record lookups (the one
        # bound in its place), then the preference (a tuple made in one go)
        key = ((record_id, None, None, preference_id) if place == 0
               else (None, record_id, None, preference_id) if place == 1
               else (None, None, record_id, preference_id))
        table = tables[_SUBSCRIPTIONS_SET]
        row_id = new_guid()
        if key in table.unique or row_id in table.rows:
            return None
        row: Row = _BLANK_SUBSCRIPTION.copy()
        row[_SUBSCRIPTION_PK] = row_id
        row[_STATUS] = status
        row[_PREFERENCE] = preference_id
        row[column] = record_id
        row["createdon"] = at = self._stamp_time()
        return self._keep(SUBSCRIPTIONS, row_id, row, unique=key, at=at, new_in=table)

    def _usual_update(self, row_id: str, body: Any) -> Row | None:
        """update of a subscription's status alone (as clients send it), as usual_create.

        1. The row exists and the status is an accepted choice (an int, not a bool).
        2. Neither the row's state nor its record is read-only; its state and status are
           valid; its alternate key is its own.
        3. The row is copied with the status, stamped and stored as the general path does it.
        """
        if type(body) is not dict or len(body) != 1:
            return None
        status = body.get(_STATUS)
        choices = _STATUS_CHOICES
        if type(status) is not int or (choices is not None and status not in choices):
            return None
        table = self.store.tables[SUBSCRIPTIONS.entity_set]
        old = table.rows.get(row_id)
        if old is None:
            return None
        state, states = old.get("statecode"), SUBSCRIPTIONS.states
        if (state in SUBSCRIPTIONS.read_only_states or state not in states
                or old.get("statuscode") not in states[state]):
            return None
        refs = tuple(map(old.get, _RECORD_VALUE_COLUMNS))
        preference = old.get(_PREFERENCE)
        if (len(refs) - refs.count(None) != 1 or preference is None
                or not self._record_editable(old)):
            return None
        key = (*refs, preference)
        if table.unique.get(key, row_id) != row_id:
            return None
        row = dict(old)
        row[_STATUS] = status
        return self._keep(SUBSCRIPTIONS, row_id, row, unique=key, at=None)

    def delete(self, schema: TableSchema, row_id: str, *, cascade: bool = False) -> None:
        table = self.store.tables[schema.entity_set]
        row = table.rows.get(row_id)
        if row is None:
            raise not_found(schema.logical, row_id)
        if schema is SUBSCRIPTIONS and not cascade:
            self._check_record_editable(row)
        subs = self.store.tables[SUBSCRIPTIONS.entity_set]
        if schema.entity_set in ("contacts", "leads", "accounts", "psync_marketingpreferences"):
            column = ("_psync_preferenceid_value" if schema.entity_set == "psync_marketingpreferences"
                      else f"_psync_{schema.logical}id_value")
            for sub_id in list(subs.lookup(column, row_id)):
                self.delete(SUBSCRIPTIONS, sub_id, cascade=True)
        for list_id in list(self.store.member_of.get(row_id, ())):
            self.store.remove_member(list_id, row_id, self.store.next_version())
        if schema.entity_set == "lists":
            for member_id in list(self.store.members.get(row_id, ())):
                self.store.remove_member(row_id, member_id, self.store.next_version())
        self.store.delete(schema.entity_set, row_id, self.store.next_version())
        self.on_write()

    # -- rules -----------------------------------------------------------------------------------

    def _check(self, schema: TableSchema, row: Row, old: Row | None) -> tuple[Any, ...] | None:
        """Check a row against the rules; its alternate key, if its table has one."""
        if schema.entity_set == "lists":
            if not row.get("listname"):
                raise ApiError(400, INVALID_ARGUMENT, "Attribute 'listname' cannot be NULL.")
            code = row.get("createdfromcode")
            if code not in LIST_MEMBER_TYPES:
                raise _validation("The value of 'createdfromcode' on record of type 'list' must "
                                  "be 1 (account), 2 (contact) or 4 (lead).")
            if old is not None and old.get("createdfromcode") != code:
                raise ApiError(400, INVALID_ARGUMENT, "The member type (createdfromcode) of a "
                               "marketing list can't be changed after it is created.")
        if schema is SUBSCRIPTIONS:
            return self._check_subscription(row, old)
        return None

    def _check_subscription(self, row: Row, old: Row | None) -> tuple[Any, ...] | None:
        get = row.get
        refs = (get(_CONTACT), get(_LEAD), get(_ACCOUNT))
        if len(refs) - refs.count(None) != 1:  # exactly one record bound
            raise ApiError(400, PLUGIN_ERROR, "A marketing preference subscription must refer to "
                           "exactly one contact, lead or account (psync_contactid, psync_leadid "
                           "or psync_accountid).")
        preference = get(_PREFERENCE)
        if preference is None:
            raise ApiError(400, PLUGIN_ERROR, "A marketing preference subscription must refer to "
                           "a marketing preference (psync_preferenceid).")
        if get("psync_status") is None:
            raise ApiError(400, PLUGIN_ERROR, "A marketing preference subscription needs a "
                           "psync_status: 100000000 (Opted in) or 100000001 (Opted out).")
        if old is not None:
            self._check_record_editable(old)
        # (the same records as before, just checked, need no second look)
        if old is None or tuple(map(old.get, _RECORD_VALUE_COLUMNS)) != refs:
            self._check_record_editable(row)
        table = self.store.tables[SUBSCRIPTIONS.entity_set]
        key = (*refs, preference)  # (Table.unique_key, as the alternate key's columns run)
        holder = table.unique.get(key)
        if holder is not None and holder != row[SUBSCRIPTIONS.pk]:
            raise ApiError(412, DUPLICATE_RECORD,
                           "A record that has the attribute values of the record and preference "
                           "already exists. The entity key psync_record_preference requires that "
                           "this set of attributes contains unique values. Select unique values "
                           "and try again.")
        return key

    def _record_editable(self, row: Row) -> bool:
        """Whether _check_record_editable passes ``row``."""
        for _, column, target in _RECORD_COLUMNS:
            ref = row.get(column)
            if ref is not None:
                record = self.store.tables[target.entity_set].rows.get(ref)
                if record is not None and record.get("statecode") in target.read_only_states:
                    return False
        return True

    def _check_record_editable(self, row: Row) -> None:
        for _, column, target in _RECORD_COLUMNS:
            ref = row.get(column)
            if ref is None:
                continue
            record = self.store.tables[target.entity_set].rows.get(ref)
            if record is not None and record.get("statecode") in target.read_only_states:
                raise ApiError(400, PLUGIN_ERROR,
                               f"The marketing preferences of {target.logical} {ref} can't be "
                               f"changed: the {target.logical} is read-only (statecode "
                               f"{record.get('statecode')}). Reactivate it first.")

    # -- marketing lists -------------------------------------------------------------------------

    def member_set(self, list_id: str) -> str:
        lst = self.store.tables["lists"].rows.get(list_id)
        if lst is None:
            raise not_found("list", list_id)
        return LIST_MEMBER_TYPES[lst["createdfromcode"]]

    def add_member(self, list_id: str, member_id: str, *, relationship: str | None = None) -> None:
        member_set = self.member_set(list_id)
        if relationship is not None and MANY_TO_MANY[relationship].member_set != member_set:
            raise ApiError(400, INVALID_ARGUMENT,
                           f"The marketing list {list_id} holds {member_set}; "
                           f"{MANY_TO_MANY[relationship].member_set} can't be added to it.")
        if member_id not in self.store.tables[member_set].rows:
            raise not_found(TABLES[member_set].logical, member_id)
        if self.store.is_member(list_id, member_id):
            return
        row = listmember_row(list_id, member_id, TABLES[member_set].logical,
                             at=self._stamp_time(),
                             version=self.store.next_version())
        self.store.add_member(list_id, member_id, row)
        self.on_write()

    def remove_member(self, list_id: str, member_id: str) -> None:
        self.member_set(list_id)
        if (self.store.is_member(list_id, member_id)
                and self.store.remove_member(list_id, member_id, self.store.next_version())):
            self.on_write()
