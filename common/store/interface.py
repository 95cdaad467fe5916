"""The ledger store's interface: what the services may ask of it, whatever the database.

It is split by role (:class:`KeyStates`, :class:`Contacts`, :class:`Checkpoints`,
:class:`Directory`, :class:`Parking`, :class:`Outstanding`, :class:`Coordination`,
:class:`PersonalData`, and :class:`~common.store.batch_reads.BatchReader`: a batch's reads
at once); :class:`LedgerStore` is all of them. A function or service takes the
narrowest role (or a protocol composed of the few it uses), so its needs show in its signature
and a test can hand it a small fake.

Key states are saved with compare-and-set on a per-key ``revision`` so that reconciler replicas
never overwrite each other's decisions: a save whose expected revisions no longer hold raises
:class:`ConflictError` and writes nothing; the caller reloads and decides again. A store whose
saves are one at a time anyway (SQLite's) can also hold its key states
(:meth:`KeyStates.holding`): loaded and saved in one transaction no other process saves in, a
save cannot meet a conflict.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self

from common.domain import ContactState, HistoryEntry, KeyState, Observation, PreferenceKey
from common.domain.rows import HistoryRow, KeyTuple, ObservationRow, StateRow
from common.store.batch_reads import BatchReader
from common.store.directory import EmailChange, RecordRef, SubscriptionRow
from common.store.outstanding import DueKey, OutstandingStats
from common.store.write_batches import WriteBatch
from common.vendors.budget import BudgetGrant

# (expected revision — None or 0: the key must not be stored yet; the new state; its history row)
Change = tuple[int | None, KeyState, HistoryEntry | None]
# The same for the batch hot path: (expected revision, the key's parts, the new state's row)
RowChange = tuple[int | None, KeyTuple, StateRow]


class StoreUnavailable(RuntimeError):
    """The ledger cannot be opened; the message never holds credentials. ``transient``: it
    could not be reached or was locked (down, restarting, a long write), as opposed to refusing
    us (bad credentials or database: a configuration error)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ConflictError(Exception):
    """Some keys' stored revisions moved since they were loaded; nothing was written."""

    def __init__(self, keys: Sequence[PreferenceKey]) -> None:
        super().__init__(f"{len(keys)} key state(s) changed concurrently")
        self.keys = tuple(keys)


class RowStates(Protocol):
    """Key states loaded and saved as rows (the batch hot path), with compare-and-set."""

    async def load_rows(self, keys: Iterable[KeyTuple]) -> dict[KeyTuple, StateRow]:
        """:meth:`KeyStates.load` for the batch hot path: the stored states' rows
        (:mod:`common.domain.rows`), by the keys' parts."""
        ...

    async def save_rows(self, changes: Sequence[RowChange], *,
                        history: Sequence[HistoryRow[KeyTuple]] = (),
                        recorded_at: datetime | None = None,
                        entries: Sequence[HistoryEntry] = (),
                        contacts: Sequence[ContactState] = (),
                        subscriptions: Sequence[tuple[str, SubscriptionRow]] = (),
                        ended_batches: Sequence[tuple[str, str]] = ()
                        ) -> list[int]:
        """:meth:`KeyStates.save` for the batch hot path: state rows, the kernel's history rows (of
        decisions ``recorded_at``, default now) and other history ``entries``; the same
        compare-and-set, transaction and index. ``contacts`` are saved in the same transaction,
        as :meth:`Contacts.save_contacts` saves them (monotonic, no compare-and-set); so are
        ``subscriptions`` ((account, row) pairs), as
        :meth:`Directory.upsert_subscriptions` saves them.

        ``ended_batches``: the (account, id) of write batches whose outcome the changes record,
        deleted in the same transaction (:mod:`common.store.write_batches`, rule 3)."""
        ...


class KeyStates(RowStates, Protocol):
    """Per-key states, saved with compare-and-set, and their history."""

    def holding(self) -> AbstractAsyncContextManager[RowStates] | None:
        """A transaction that holds the key states: no other process saves one until it
        ends, so what is loaded there is what a save there compares with, and a save after a
        conflict loads and saves there, meeting no other (committed as the transaction
        ends). None where the store does not hold them: there a conflict is tried again
        (PostgreSQL, whose replicas save at once, each locking only its own rows)."""
        ...

    async def load(self, keys: Iterable[PreferenceKey]) -> dict[PreferenceKey, KeyState]:
        """The stored states of those ``keys`` that have one."""
        ...

    async def save(self, changes: Sequence[Change], *,
                   history: Sequence[HistoryEntry] = ()) -> list[int]:
        """Save all ``changes`` and history rows in one transaction, or raise
        :class:`ConflictError` and save nothing.

        Returns the new revision of each change, in order: ``(expected or 0) + 1`` (the
        ``revision`` carried by the states themselves is ignored). Extra ``history`` rows (for
        decisions that changed no state) go in the same transaction, and so does the index of
        keys with outstanding writes (:mod:`common.store.outstanding`)."""
        ...

    async def begin_writes(self, batch: WriteBatch) -> None:
        """Record a round's writes as in flight, in a transaction of their own
        (:mod:`common.store.write_batches`, rule 1). Every read of key states (:meth:`load`,
        :meth:`load_rows`, :meth:`states_for_email`, a batch read) gives each key the records
        of its writes in flight, read from the same snapshot (rule 2)."""
        ...

    async def states_for_email(self, account: str, email: str) -> list[KeyState]: ...

    async def history(self, account: str, email: str) -> list[HistoryEntry]:
        """History rows of one email, oldest recorded first."""
        ...

    async def decided(self, rows: Sequence[ObservationRow[KeyTuple]], *,
                      decisions: Collection[str]) -> set[ObservationRow[KeyTuple]]:
        """Of ``rows``, those whose change the history holds decided (for the row's key and
        side, with its value) under one of ``decisions``: rule 3 of
        :mod:`common.domain.reconcile`."""
        ...


class Contacts(Protocol):
    """Each contact's status (suppressed or not), per account and email."""

    async def load_contacts(self, account: str,
                            emails: Iterable[str]) -> dict[str, ContactState]: ...

    async def suppressed_among(self, account: str, emails: Collection[str]) -> set[str]:
        """Of ``emails`` (normalised), those whose stored contact is suppressed."""
        ...

    async def save_contacts(self, contacts: Sequence[ContactState]) -> None:
        """Upsert; a stored state with a later ``since`` is kept (monotonic)."""
        ...


class Checkpoints(Protocol):
    """Small named values per account (:mod:`common.store.checkpoints` names them)."""

    async def get_checkpoint(self, account: str, source: str) -> str | None: ...

    async def set_checkpoint(self, account: str, source: str, value: str) -> None: ...


    async def swap_checkpoint(self, account: str, source: str, expected: str | None,
                              value: str) -> bool:
        """Set the checkpoint to ``value`` only if it still holds ``expected`` (None: unset)."""
        ...


class Directory(Protocol):
    """The Dynamics record directory (:mod:`common.store.directory`)."""

    # Eligibility: records ever in an email-activated list (never removed).
    async def mark_eligible(self, account: str, record_ids: Iterable[str]) -> set[str]:
        """Returns the records that were not eligible before; each gets a follow-up."""
        ...

    async def follow_ups(self, account: str) -> set[str]:
        """Newly eligible records whose dependent work is not confirmed yet."""
        ...

    async def clear_follow_ups(self, account: str, record_ids: Iterable[str]) -> None: ...

    async def note_email_changes(self, account: str, changes: Sequence[EmailChange]) -> None:
        """Email changes seen in the directory, kept until their follow-up is confirmed."""
        ...

    async def email_changes(self, account: str) -> list[EmailChange]: ...

    async def clear_email_changes(self, account: str, changes: Sequence[EmailChange]) -> None: ...

    async def eligible_ids(self, account: str, record_ids: Iterable[str]) -> set[str]: ...

    async def upsert_records(self, account: str, records: Sequence[RecordRef]) -> None: ...

    async def forget_records(self, account: str, record_ids: Sequence[str]) -> None: ...

    async def records(self, account: str, record_ids: Sequence[str]) -> dict[str, RecordRef]: ...

    async def emails_of_records(self, account: str, record_ids: Sequence[str]) -> set[str]: ...

    async def records_for_emails(self, account: str,
                                 emails: Iterable[str]) -> dict[str, list[RecordRef]]: ...

    async def eligible_emails(self, account: str, emails: Iterable[str]) -> set[str]: ...

    async def upsert_subscriptions(self, account: str,
                                   rows: Sequence[SubscriptionRow]) -> None: ...

    async def forget_subscriptions(self, account: str,
                                   subscription_ids: Sequence[str]) -> None: ...

    async def subscriptions_for(self, account: str, pairs: Sequence[tuple[str, str]]
                                ) -> dict[tuple[str, str], SubscriptionRow]: ...

    async def defer_writes(self, account: str, keys: Iterable[tuple[int, str]]) -> None: ...

    async def deferred_emails(self, account: str, preference_id: int) -> list[str]: ...

    async def clear_deferred(self, account: str, preference_id: int,
                             emails: Sequence[str]) -> None: ...


class Parking(Protocol):
    """Observations parked while their contact is suppressed (:mod:`common.store.parking`)."""

    # Newest per (account, email, preference, side): by version when both have one, else by
    # origin time. Folded in when the contact is resubscribed.
    async def park_observations(self, observations: Sequence[Observation]) -> None: ...

    async def parked_observations(
            self, account: str, emails: Iterable[str], *,
            unplaced: Callable[[Observation], Observation] | None = None) -> list[Observation]:
        """Parked observations of those emails, in origin-time order, each placed in our time
        base as it was when parked; one parked by a release that kept no placement is placed
        by ``unplaced`` (None: left on its vendor's clock)."""
        ...

    async def unpark_observations(self, account: str, emails: Iterable[str]) -> None: ...

    # Resubscriptions whose write commands are not confirmed yet: marked before the contact is
    # saved as no longer suppressed, cleared once the email's writes are published.
    async def mark_resuming(self, account: str, emails: Iterable[str]) -> None: ...

    async def resuming_contacts(self, account: str, emails: Iterable[str]) -> set[str]:
        """Those of ``emails`` marked as resuming."""
        ...

    async def clear_resuming(self, account: str, emails: Iterable[str]) -> None: ...


class Outstanding(Protocol):
    """Keys with outstanding writes (:mod:`common.store.outstanding`)."""

    # Contacts that are suppressed are left out: their writes are parked on purpose.
    async def outstanding_stats(self, account: str, *,
                                since_before: datetime) -> OutstandingStats:
        """Keys whose writes have been outstanding since before ``since_before``."""
        ...

    async def outstanding_due(self, account: str, *, since_before: datetime, now: datetime,
                              limit: int) -> list[DueKey]:
        """Those of them whose sweep is due at ``now``, the longest due first."""
        ...

    async def postpone_outstanding(self, due: Sequence[tuple[PreferenceKey, datetime]]) -> None:
        """Swept keys: due again at the given times."""
        ...

    async def drop_outstanding(self, settled: Sequence[tuple[PreferenceKey, int]]) -> None:
        """Keys found with nothing outstanding at a revision: their rows go, unless a later save
        wrote them."""
        ...

    async def index_outstanding(self, account: str, *, limit: int) -> bool:
        """Index one page of states saved before the index existed; True once done."""
        ...


class Coordination(Protocol):
    """Leases, group membership and shared request budgets of replicas
    (:mod:`common.store.coordination`)."""

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take (or renew) lease ``name`` for ``ttl_s``; False while another holder has it."""
        ...

    async def renew_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Extend the lease only while it is still ours (False once it expired)."""
        ...

    async def release_lease(self, name: str, holder: str) -> None: ...

    async def lease_holder(self, name: str) -> str | None: ...

    async def heartbeat(self, member: str, details: Mapping[str, str],
                        ttl_s: float) -> dict[str, dict[str, str]]:
        """Renew ``member`` in each group of ``details`` (group -> what it reports) for
        ``ttl_s``; returns the live members of those groups (member -> detail)."""
        ...

    async def leave(self, member: str, groups: Iterable[str]) -> None: ...

    async def members(self, group: str) -> dict[str, str]: ...

    async def claim_budget(self, bucket: str, claimer: str, *, tokens: int, limit: int,
                           span_s: float) -> BudgetGrant:
        """Claim up to ``tokens`` of ``bucket``'s budget: the claims of the last ``span_s``
        never add up to more than ``limit`` (:mod:`common.vendors.budget`, rules 2-4)."""
        ...


class PersonalData(Protocol):
    """Erasure and history retention (:mod:`common.store.personal`)."""

    async def personal_data(self, account: str, email: str) -> dict[str, int]:
        """Rows held for one email in one account, per table; changes nothing."""
        ...

    async def forget_email(self, account: str, email: str) -> dict[str, int]:
        """Remove everything held for one email in one account (key states with their
        registers and write ledger, history, contact state, parked values, deferred writes,
        directory records with their subscription rows), in one transaction; rows removed per
        table."""
        ...

    async def prune_history(self, account: str, *, before: datetime, limit: int = 5000) -> int:
        """Remove up to ``limit`` history rows recorded before ``before``, oldest first;
        returns how many. Key states are never pruned."""
        ...


class LedgerStore(KeyStates, Contacts, Checkpoints, Directory, Parking, Outstanding,
                  Coordination, PersonalData, BatchReader, Protocol):
    """The whole store, as opened by :func:`common.store.open_store`."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None: ...
