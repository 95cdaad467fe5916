"""The tables the simulated Dataverse organisation holds, and their columns.

Built-in tables (contact, lead, account, list) carry the columns a marketing-preference sync
needs. Our solution's tables use the publisher prefix ``psync``. Lookup columns are read back as
``_<name>_value`` and written through ``<name>@odata.bind``; the navigation property of a lookup
has the lookup's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Kind(Enum):
    """Column types."""

    STRING = "string"
    BOOL = "bool"
    INT = "int"
    BIGINT = "bigint"
    GUID = "guid"  # a primary key
    LOOKUP = "lookup"  # a lookup's _x_value
    DATETIME = "datetime"
    CHOICE = "choice"  # picklist, state or status

    @property
    def edm(self) -> str:
        return _EDM[self]


_EDM = {
    Kind.STRING: "Edm.String", Kind.BOOL: "Edm.Boolean", Kind.INT: "Edm.Int32",
    Kind.BIGINT: "Edm.Int64", Kind.GUID: "Edm.Guid", Kind.LOOKUP: "Edm.Guid",
    Kind.DATETIME: "Edm.DateTimeOffset", Kind.CHOICE: "Edm.Int32",
}


@dataclass(frozen=True, kw_only=True)
class Column:
    name: str
    kind: Kind
    read_only: bool = False
    max_length: int | None = None
    choices: tuple[tuple[int, str], ...] = ()
    target: str | None = None  # entity set a lookup points to
    metadata_type: str = ""  # AttributeType in EntityDefinitions

    @property
    def attribute_type(self) -> str:
        if self.metadata_type:
            return self.metadata_type
        return {
            Kind.STRING: "String", Kind.BOOL: "Boolean", Kind.INT: "Integer",
            Kind.BIGINT: "BigInt", Kind.GUID: "Uniqueidentifier", Kind.LOOKUP: "Lookup",
            Kind.DATETIME: "DateTime", Kind.CHOICE: "Picklist",
        }[self.kind]


@dataclass(frozen=True, kw_only=True)
class Lookup:
    """A single-valued navigation property (``psync_contactid``) over column ``_psync_contactid_value``."""

    nav: str
    column: str
    target: str  # entity set


@dataclass(frozen=True, kw_only=True)
class ManyToMany:
    """An N:N relationship between marketing lists and one member table."""

    name: str  # e.g. listcontact_association
    member_set: str  # contacts / leads / accounts
    created_from_code: int  # the list's createdfromcode for this member type


@dataclass(frozen=True, kw_only=True)
class TableSchema:
    logical: str
    entity_set: str
    pk: str
    primary_name: str
    columns: dict[str, Column]
    object_type_code: int
    custom: bool = False
    lookups: dict[str, Lookup] = field(default_factory=dict)
    indexed: tuple[str, ...] = ()  # hash-indexed columns (strings lower-cased)
    states: dict[int, tuple[int, ...]] = field(default_factory=dict)  # statecode -> statuscodes
    read_only_states: frozenset[int] = frozenset()  # statecodes whose rows refuse updates
    unique: tuple[str, ...] = ()  # columns whose values together are unique (an alternate key)
    change_tracking: bool = True
    # Only RetrieveMultiple (``GET /<set>``): rows come and go through other messages and are
    # never updated, so ``createdon`` equals ``modifiedon`` on every row.
    query_only: bool = False

    @property
    def type_name(self) -> str:
        return f"Microsoft.Dynamics.CRM.{self.logical}"

    def default_status(self, state: int) -> int:
        return self.states[state][0]


def _system_columns(pk: str, states: dict[int, tuple[int, ...]],
                    state_labels: dict[int, str], status_labels: dict[int, str]) -> list[Column]:
    return [
        Column(name=pk, kind=Kind.GUID, metadata_type="Uniqueidentifier"),
        Column(name="statecode", kind=Kind.CHOICE, metadata_type="State",
               choices=tuple((s, state_labels[s]) for s in states)),
        Column(name="statuscode", kind=Kind.CHOICE, metadata_type="Status",
               choices=tuple((c, status_labels[c]) for codes in states.values() for c in codes)),
        Column(name="createdon", kind=Kind.DATETIME, read_only=True),
        Column(name="modifiedon", kind=Kind.DATETIME, read_only=True),
        Column(name="versionnumber", kind=Kind.BIGINT, read_only=True),
    ]


_PERSON_FLAGS = [
    Column(name="emailaddress1", kind=Kind.STRING, max_length=100),
    Column(name="donotbulkemail", kind=Kind.BOOL),
    Column(name="donotemail", kind=Kind.BOOL),
]

# a person's name; ``fullname`` is composed from the other two by every write
_PERSON_NAME = [
    Column(name="firstname", kind=Kind.STRING, max_length=50),
    Column(name="lastname", kind=Kind.STRING, max_length=50),
    Column(name="fullname", kind=Kind.STRING, read_only=True, max_length=160),
]

_ACTIVE_STATES: dict[int, tuple[int, ...]] = {0: (1,), 1: (2,)}
_ACTIVE_STATE_LABELS = {0: "Active", 1: "Inactive"}
_ACTIVE_STATUS_LABELS = {1: "Active", 2: "Inactive"}


def _table(*, logical: str, entity_set: str, pk: str, primary_name: str, otc: int,
           columns: list[Column], states: dict[int, tuple[int, ...]],
           state_labels: dict[int, str], status_labels: dict[int, str], custom: bool = False,
           lookups: tuple[Lookup, ...] = (), indexed: tuple[str, ...] = (),
           read_only_states: frozenset[int] = frozenset(),
           unique: tuple[str, ...] = ()) -> TableSchema:
    cols = _system_columns(pk, states, state_labels, status_labels) + columns
    for lookup in lookups:
        cols.append(Column(name=lookup.column, kind=Kind.LOOKUP, target=lookup.target))
    return TableSchema(
        logical=logical, entity_set=entity_set, pk=pk, primary_name=primary_name,
        columns={c.name: c for c in cols}, object_type_code=otc, custom=custom,
        lookups={lk.nav: lk for lk in lookups}, indexed=indexed, states=states,
        read_only_states=read_only_states, unique=unique)


CONTACTS = _table(
    logical="contact", entity_set="contacts", pk="contactid", primary_name="fullname", otc=2,
    columns=[
        *_PERSON_NAME,
        *_PERSON_FLAGS,
    ],
    states=_ACTIVE_STATES, state_labels=_ACTIVE_STATE_LABELS, status_labels=_ACTIVE_STATUS_LABELS,
    indexed=("emailaddress1",), read_only_states=frozenset({1}))

LEADS = _table(
    logical="lead", entity_set="leads", pk="leadid", primary_name="fullname", otc=4,
    columns=[
        *_PERSON_NAME,
        Column(name="companyname", kind=Kind.STRING, max_length=100),
        Column(name="subject", kind=Kind.STRING, max_length=300),
        *_PERSON_FLAGS,
    ],
    states={0: (1, 2), 1: (3,), 2: (4, 5, 6, 7)},
    state_labels={0: "Open", 1: "Qualified", 2: "Disqualified"},
    status_labels={1: "New", 2: "Contacted", 3: "Qualified", 4: "Lost", 5: "Cannot Contact",
                   6: "No Longer Interested", 7: "Canceled"},
    indexed=("emailaddress1",), read_only_states=frozenset({1, 2}))

ACCOUNTS = _table(
    logical="account", entity_set="accounts", pk="accountid", primary_name="name", otc=1,
    columns=[Column(name="name", kind=Kind.STRING, max_length=160), *_PERSON_FLAGS],
    states=_ACTIVE_STATES, state_labels=_ACTIVE_STATE_LABELS, status_labels=_ACTIVE_STATUS_LABELS,
    indexed=("emailaddress1",), read_only_states=frozenset({1}))

# createdfromcode of a marketing list -> the member table
LIST_MEMBER_TYPES = {1: "accounts", 2: "contacts", 4: "leads"}

LISTS = _table(
    logical="list", entity_set="lists", pk="listid", primary_name="listname", otc=4300,
    columns=[
        Column(name="listname", kind=Kind.STRING, max_length=128),
        Column(name="createdfromcode", kind=Kind.CHOICE,
               choices=((1, "Account"), (2, "Contact"), (4, "Lead"))),
        Column(name="type", kind=Kind.BOOL),
        Column(name="description", kind=Kind.STRING, max_length=2000),
        Column(name="psync_emailactivated", kind=Kind.BOOL),
    ],
    states={0: (0,), 1: (1,)}, state_labels=_ACTIVE_STATE_LABELS,
    status_labels={0: "Active", 1: "Inactive"})

# The marketing list member intersect table (listmember, ObjectTypeCode 4301): one row per
# membership, made by AddMemberList or an association and removed with it. The Web API serves
# RetrieveMultiple on ``listmembers`` with these properties (its lookups have no navigation
# properties); Create and Delete exist too but are not simulated, Retrieve and Update don't.
# Whether the table has change tracking is not documented: it is off here (the stricter guess).
LISTMEMBERS = TableSchema(
    logical="listmember", entity_set="listmembers", pk="listmemberid", primary_name="name",
    object_type_code=4301, change_tracking=False, query_only=True,
    columns={c.name: c for c in (
        Column(name="listmemberid", kind=Kind.GUID, metadata_type="Uniqueidentifier"),
        Column(name="_listid_value", kind=Kind.LOOKUP, read_only=True, target="lists"),
        # polymorphic: an account, contact or lead (``entitytype`` says which)
        Column(name="_entityid_value", kind=Kind.LOOKUP, read_only=True),
        Column(name="entitytype", kind=Kind.STRING, read_only=True, metadata_type="EntityName"),
        Column(name="createdon", kind=Kind.DATETIME, read_only=True),
        Column(name="modifiedon", kind=Kind.DATETIME, read_only=True),
        Column(name="versionnumber", kind=Kind.BIGINT, read_only=True),
    )})

PREFERENCES = _table(
    logical="psync_marketingpreference", entity_set="psync_marketingpreferences",
    pk="psync_marketingpreferenceid", primary_name="psync_name", otc=10001, custom=True,
    columns=[
        Column(name="psync_name", kind=Kind.STRING, max_length=100),
        Column(name="psync_publicname", kind=Kind.STRING, max_length=100),
        Column(name="psync_ispublic", kind=Kind.BOOL),
        Column(name="psync_iscategory", kind=Kind.BOOL),
        Column(name="psync_ecaccount", kind=Kind.STRING, max_length=100),
        Column(name="psync_ecpreferenceid", kind=Kind.INT),
        Column(name="psync_eccategoryid", kind=Kind.INT),
        Column(name="psync_order", kind=Kind.INT),  # dotdigital's display order
    ],
    states=_ACTIVE_STATES, state_labels=_ACTIVE_STATE_LABELS, status_labels=_ACTIVE_STATUS_LABELS,
    indexed=("psync_ecpreferenceid", "psync_ecaccount"))

OPTED_IN = 100000000
OPTED_OUT = 100000001

SUBSCRIPTIONS = _table(
    logical="psync_marketingpreferencesubscription",
    entity_set="psync_marketingpreferencesubscriptions",
    pk="psync_marketingpreferencesubscriptionid", primary_name="psync_name", otc=10002,
    custom=True,
    columns=[
        Column(name="psync_name", kind=Kind.STRING, max_length=100),
        Column(name="psync_status", kind=Kind.CHOICE,
               choices=((OPTED_IN, "Opted in"), (OPTED_OUT, "Opted out"))),
    ],
    states=_ACTIVE_STATES, state_labels=_ACTIVE_STATE_LABELS, status_labels=_ACTIVE_STATUS_LABELS,
    lookups=(
        Lookup(nav="psync_preferenceid", column="_psync_preferenceid_value",
               target="psync_marketingpreferences"),
        Lookup(nav="psync_contactid", column="_psync_contactid_value", target="contacts"),
        Lookup(nav="psync_leadid", column="_psync_leadid_value", target="leads"),
        Lookup(nav="psync_accountid", column="_psync_accountid_value", target="accounts"),
    ),
    indexed=("_psync_preferenceid_value", "_psync_contactid_value", "_psync_leadid_value",
             "_psync_accountid_value"),
    unique=("_psync_contactid_value", "_psync_leadid_value", "_psync_accountid_value",
            "_psync_preferenceid_value"))

# The record lookups of a subscription: exactly one is set.
SUBSCRIPTION_RECORD_LOOKUPS = ("psync_contactid", "psync_leadid", "psync_accountid")

TABLES: dict[str, TableSchema] = {
    t.entity_set: t for t in (CONTACTS, LEADS, ACCOUNTS, LISTS, LISTMEMBERS, PREFERENCES,
                              SUBSCRIPTIONS)
}
BY_LOGICAL: dict[str, TableSchema] = {t.logical: t for t in TABLES.values()}

MANY_TO_MANY: dict[str, ManyToMany] = {
    m.name: m for m in (
        ManyToMany(name="listcontact_association", member_set="contacts", created_from_code=2),
        ManyToMany(name="listlead_association", member_set="leads", created_from_code=4),
        ManyToMany(name="listaccount_association", member_set="accounts", created_from_code=1),
    )
}


def many_to_many_for(entity_set: str, nav: str) -> ManyToMany | None:
    """The N:N relationship ``nav`` seen from ``entity_set`` (a list or a member table)."""
    rel = MANY_TO_MANY.get(nav)
    if rel is None or entity_set not in ("lists", rel.member_set):
        return None
    return rel
