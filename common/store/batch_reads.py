"""What a batch reads of the ledger before it decides, asked of one snapshot at once.

A reconciler's batch used to read its contacts, its resubscription marks, both clocks'
checkpoints, its key states and its eligible emails as six transactions; a writer's round read
four. On a loaded machine each such read costs 10-20 ms of waiting (a trip to SQLite's thread
per statement, the connection's lock, the event loop in between) however small it is, and a
steady sync's changes spend most of their time queued behind those waits. So:

1. A batch says what it needs (:class:`BatchReads`) and gets it all back
   (:class:`BatchSnapshot`) from one read transaction: on SQLite one job in the connection's
   thread, on PostgreSQL one transaction on one pooled connection.
2. Each part reads exactly what its own method reads (the same SQL, the same rows):
   :meth:`~common.store.interface.Contacts.load_contacts`,
   :meth:`~common.store.interface.KeyStates.load_rows`,
   :meth:`~common.store.interface.Directory.eligible_emails`,
   :meth:`~common.store.interface.Directory.records_for_emails`,
   :meth:`~common.store.interface.Parking.resuming_contacts` and
   :meth:`~common.store.interface.Checkpoints.get_checkpoint`. A store without a snapshot
   of its own (the dry run's overlay) answers part by part (:func:`read_apart`).
   Key states come with the writes in flight of the open write batches, read from the same
   snapshot (:mod:`common.store.write_batches`); the batches are part of the answer.
3. Emails are taken as given: a batch's emails come from decoded messages, normalised by the
   poller that read them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from common.domain import ContactState
from common.domain.rows import KeyTuple, StateRow
from common.store.codec import decode_rows, from_us
from common.store.directory import RecordRef, records_by_email
from common.store.write_batches import WriteBatch, list_query, with_writes_in_flight

# which part of the snapshot a query's rows are for
Part = Literal["contacts", "states", "eligible", "records", "resuming", "checkpoints",
               "write_batches"]
# (part, SQL with ``?`` parameters, its parameters)
Query = tuple[Part, str, list[Any]]

# Values per IN list: well under SQLite's parameter limit, with the account's too.
_CHUNK = 500


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchReads:
    """What one batch of an ``account`` reads before it decides."""

    account: str
    contacts_of: Sequence[str] = ()  # emails whose contact states are read
    states_of: Sequence[KeyTuple] = ()  # keys whose states (as rows) are read
    eligible_of: Sequence[str] = ()  # emails asked whether an eligible record has them
    records_of: Sequence[str] = ()  # emails whose eligible records are read
    resuming_of: Sequence[str] = ()  # emails asked whether they are marked as resuming
    checkpoints: Sequence[str] = ()  # the account's checkpoints read, by name


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchSnapshot:
    """The answers, each as its own method gives it."""

    contacts: dict[str, ContactState] = field(default_factory=dict)
    states: dict[KeyTuple, StateRow] = field(default_factory=dict)
    eligible: set[str] = field(default_factory=set)
    records: dict[str, list[RecordRef]] = field(default_factory=dict)
    resuming: set[str] = field(default_factory=set)
    checkpoints: dict[str, str | None] = field(default_factory=dict)
    # the open write batches of the account, read with the states (none when no state is)
    write_batches: list[WriteBatch] = field(default_factory=list)


class BatchReader(Protocol):
    """A store that reads a batch's snapshot."""

    async def read_batch(self, reads: BatchReads) -> BatchSnapshot: ...


def _in_lists(part: Part, head: str, account: str, values: Sequence[Any]) -> list[Query]:
    """``head`` ends with ``IN``; one query per chunk of ``values``."""
    return [(part, f"{head} ({','.join('?' * len(chunk))})", [account, *chunk])
            for start in range(0, len(values), _CHUNK)
            if (chunk := values[start:start + _CHUNK])]


def queries(reads: BatchReads, *, state_queries: Sequence[tuple[str, list[Any]]]
            ) -> list[Query]:
    """Every query of ``reads``, in order; ``state_queries`` are the store's own for the keys
    (:func:`common.store.sqlite.state_queries`)."""
    account = reads.account
    out: list[Query] = []
    out += _in_lists("contacts", "SELECT email, status, since, revision FROM contact_state "
                     "WHERE account = ? AND email IN", account, list(dict.fromkeys(
                         reads.contacts_of)))
    out += [("states", sql, params) for sql, params in state_queries]
    if reads.states_of:
        out.append(("write_batches", *list_query([account])))
    # the directory's query (common.store.directory.SqliteDirectory.eligible_emails)
    out += _in_lists("eligible", "SELECT email FROM dyn_records WHERE account = ? "
                     "AND eligible = 1 AND email IN", account, sorted(set(reads.eligible_of)))
    # the directory's query (common.store.directory.SqliteDirectory.records_for_emails)
    out += _in_lists("records", "SELECT record_id, record_type, email, active, eligible_at, "
                     "email_since FROM dyn_records WHERE account = ? AND eligible = 1 "
                     "AND email IN", account, sorted(set(reads.records_of)))
    out += _in_lists("resuming", "SELECT email FROM resuming_contacts WHERE account = ? "
                     "AND email IN", account, sorted(set(reads.resuming_of)))
    out += _in_lists("checkpoints", "SELECT source, value FROM checkpoint WHERE account = ? "
                     "AND source IN", account, sorted(set(reads.checkpoints)))
    return out


def snapshot(reads: BatchReads, answers: Iterable[tuple[Part, Sequence[Any]]]) -> BatchSnapshot:
    """The snapshot of ``answers``: each query's part and rows."""
    account = reads.account
    out = BatchSnapshot(checkpoints=dict.fromkeys(reads.checkpoints))
    state_rows: list[Any] = []
    record_rows: list[Any] = []
    batch_rows: list[Any] = []
    for part, rows in answers:
        if part == "contacts":
            for email, status, since, revision in rows:
                out.contacts[email] = ContactState(account=account, email=email, status=status,
                                                   since=from_us(since), revision=revision)
        elif part == "states":
            state_rows += rows
        elif part == "eligible":
            out.eligible.update(str(row[0]) for row in rows)
        elif part == "records":
            record_rows += rows
        elif part == "resuming":
            out.resuming.update(str(row[0]) for row in rows)
        elif part == "write_batches":
            batch_rows += rows
        else:
            out.checkpoints.update((str(name), str(value)) for name, value in rows)
    out.states.update(decode_rows(state_rows))
    out.write_batches.extend(with_writes_in_flight(out.states, reads.states_of, batch_rows))
    out.records.update(records_by_email(record_rows))
    return out


async def read_apart(store: Any, reads: BatchReads) -> BatchSnapshot:
    """``reads`` answered by the store's own methods, one by one (rule 2)."""
    account = reads.account
    return BatchSnapshot(
        contacts=await store.load_contacts(account, reads.contacts_of)
        if reads.contacts_of else {},
        states=await store.load_rows(reads.states_of) if reads.states_of else {},
        eligible=await store.eligible_emails(account, reads.eligible_of)
        if reads.eligible_of else set(),
        records=await store.records_for_emails(account, reads.records_of)
        if reads.records_of else {},
        resuming=await store.resuming_contacts(account, reads.resuming_of)
        if reads.resuming_of else set(),
        checkpoints={name: await store.get_checkpoint(account, name)
                     for name in reads.checkpoints})
