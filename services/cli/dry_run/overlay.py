"""A copy-on-write view of the ledger store, for ``sync-now --dry-run``.

Reads fall through to the real store; writes go to an overlay held in memory and are never
committed, so the pollers and the reconciler run exactly as in a real sync while the ledger,
its checkpoints and the delta tokens stay where they are. Only what the pollers' read paths and
the reconciler ask of the store is here (:class:`~common.store.interface.LedgerStore`); any
other call fails with ``AttributeError`` rather than reach the real store.

Each write keeps the real store's semantics (SQL in :mod:`common.store.directory`,
:mod:`common.store.parking`), so what the dry run reads back is what a real run would:

1. Key states are saved with compare-and-set on the revision the view holds, and the view's
   states shadow the stored ones.
2. Contact states are monotonic in ``since``.
3. Directory records keep their eligibility on upsert; ``email_since`` moves only when the
   email changes; eligibility is never taken back; subscription rows move only to a version at
   least as new.
4. Parked observations keep the newest per (email, preference, side): by row version when both
   have one, else by origin time.
5. Sets (follow-ups, deferred writes, resubscriptions) are the stored rows plus the view's
   additions, less its removals.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from common.domain import ContactState, HistoryEntry, KeyState, Observation, PreferenceKey
from common.domain.rows import (
    HistoryRow,
    KeyTuple,
    ObservationRow,
    StateRow,
    history_entry,
    key_of,
    key_state,
    key_tuple,
    state_row,
)
from common.domain.sides import SIDES
from common.store.batch_reads import BatchReads, BatchSnapshot, read_apart
from common.store.directory import EmailChange, RecordRef, SubscriptionRow
from common.store.interface import (
    Change,
    ConflictError,
    LedgerStore,
    RowChange,
    RowStates,
)
from common.store.write_batches import WriteBatch


class _SetOverlay:
    """A stored set of (account, item) seen through additions and removals."""

    def __init__(self) -> None:
        self.added: set[tuple[str, Any]] = set()
        self.removed: set[tuple[str, Any]] = set()

    def add(self, account: str, items: Iterable[Any]) -> None:
        for item in items:
            self.added.add((account, item))
            self.removed.discard((account, item))

    def remove(self, account: str, items: Iterable[Any]) -> None:
        for item in items:
            self.removed.add((account, item))
            self.added.discard((account, item))

    def view(self, account: str, stored: Iterable[Any]) -> set[Any]:
        seen = {item for item in stored if (account, item) not in self.removed}
        return seen | {item for a, item in self.added if a == account}


class OverlayStore:
    """The real ``store`` read through, written to memory only (see the module's rules)."""

    def __init__(self, store: LedgerStore) -> None:
        self._store = store
        self._checkpoints: dict[tuple[str, str], str] = {}
        self._states: dict[PreferenceKey, KeyState] = {}
        self.history_rows: list[HistoryEntry] = []
        self._contacts: dict[tuple[str, str], ContactState] = {}
        # record id -> record, or None once forgotten
        self._records: dict[tuple[str, str], RecordRef | None] = {}
        self._follow_ups = _SetOverlay()
        self._email_changes: dict[tuple[str, str], EmailChange | None] = {}
        # subscription id -> row, or None once forgotten
        self._subscriptions: dict[tuple[str, str], SubscriptionRow | None] = {}
        self._deferred = _SetOverlay()
        self._parked: dict[tuple[str, str, int, str], Observation] = {}
        self._unparked: set[tuple[str, str]] = set()
        self._resuming = _SetOverlay()

    # -- checkpoints ------------------------------------------------------------------------
    def moved_checkpoints(self) -> dict[tuple[str, str], str]:
        """Checkpoints a real run would have set (none of them is)."""
        return dict(self._checkpoints)

    async def get_checkpoint(self, account: str, source: str) -> str | None:
        if (account, source) in self._checkpoints:
            return self._checkpoints[(account, source)]
        return await self._store.get_checkpoint(account, source)

    async def set_checkpoint(self, account: str, source: str, value: str) -> None:
        self._checkpoints[(account, source)] = value

    async def swap_checkpoint(self, account: str, source: str, expected: str | None,
                              value: str) -> bool:
        if await self.get_checkpoint(account, source) != expected:
            return False
        self._checkpoints[(account, source)] = value
        return True

    # -- key states -------------------------------------------------------------------------
    async def load(self, keys: Iterable[PreferenceKey]) -> dict[PreferenceKey, KeyState]:
        wanted = set(keys)
        found = {k: self._states[k] for k in wanted if k in self._states}
        rest = wanted - set(found)
        if rest:
            found.update(await self._store.load(rest))
        return found

    async def save(self, changes: Sequence[Change], *,
                   history: Sequence[HistoryEntry] = ()) -> list[int]:
        current = await self.load(state.key for _, state, _ in changes)
        conflicts = [state.key for expected, state, _ in changes
                     if (current[state.key].revision if state.key in current else 0)
                     != (expected or 0)]
        if conflicts:
            raise ConflictError(conflicts)
        revisions = []
        for expected, state, row in changes:
            revision = (expected or 0) + 1
            self._states[state.key] = replace(state, revision=revision)
            revisions.append(revision)
            if row is not None:
                self.history_rows.append(row)
        self.history_rows.extend(history)
        return revisions

    async def load_rows(self, keys: Iterable[KeyTuple]) -> dict[KeyTuple, StateRow]:
        found = await self.load(map(key_of, keys))
        return {key_tuple(k): state_row(state) for k, state in found.items()}

    def holding(self) -> AbstractAsyncContextManager[RowStates] | None:
        # a dry run's saves are its own, in memory: nothing else saves beside them
        return None

    async def save_rows(self, changes: Sequence[RowChange], *,
                        history: Sequence[HistoryRow[KeyTuple]] = (),
                        recorded_at: datetime | None = None,
                        entries: Sequence[HistoryEntry] = (),
                        contacts: Sequence[ContactState] = (),
                        subscriptions: Sequence[tuple[str, SubscriptionRow]] = (),
                        ended_batches: Sequence[tuple[str, str]] = ()
                        ) -> list[int]:
        # the dry run begins no write (begin_writes), so it ends none; it keeps no index of
        # outstanding keys, nor is it the hot path: through the
        # dataclasses (the same rules as save)
        recorded = recorded_at or datetime.now(UTC)
        revisions = await self.save(
            [(expected, key_state(key_of(key), row), None) for expected, key, row in changes],
            history=[*(history_entry(h, recorded_at=recorded) for h in history), *entries])
        await self.save_contacts(contacts)
        by_account: dict[str, list[SubscriptionRow]] = {}
        for account, row in subscriptions:
            by_account.setdefault(account, []).append(row)
        for account, rows in by_account.items():
            await self.upsert_subscriptions(account, rows)
        return revisions

    async def begin_writes(self, batch: WriteBatch) -> None:
        raise RuntimeError("a dry run writes nothing to the vendors")

    async def read_batch(self, reads: BatchReads) -> BatchSnapshot:
        # through the view's own reads, which see its writes
        return await read_apart(self, reads)

    async def history(self, account: str, email: str) -> list[HistoryEntry]:
        return [*await self._store.history(account, email),
                *(h for h in self.history_rows if h.account == account and h.email == email)]

    async def decided(self, rows: Sequence[ObservationRow[KeyTuple]], *,
                      decisions: Collection[str]) -> set[ObservationRow[KeyTuple]]:
        found = await self._store.decided(rows, decisions=decisions)
        held = {(h.account, h.email, h.preference_id, h.side, h.change_id, h.opted_in)
                for h in self.history_rows if h.decision in decisions}
        return found | {row for row in rows if (*row.key, SIDES[row.side], row.change_id,
                                                 bool(row.opted_in)) in held}

    async def states_for_email(self, account: str, email: str) -> list[KeyState]:
        states = {s.key: s for s in await self._store.states_for_email(account, email)}
        states.update({k: s for k, s in self._states.items()
                       if k.account == account and k.email == email})
        return [states[k] for k in sorted(states, key=lambda k: k.preference_id)]

    # -- contacts ---------------------------------------------------------------------------
    async def load_contacts(self, account: str,
                            emails: Iterable[str]) -> dict[str, ContactState]:
        wanted = set(emails)
        found = {e: self._contacts[(account, e)] for e in wanted if (account, e) in self._contacts}
        rest = wanted - set(found)
        if rest:
            found.update(await self._store.load_contacts(account, rest))
        return found

    async def suppressed_among(self, account: str, emails: Collection[str]) -> set[str]:
        mine = {e for e in emails if (account, e) in self._contacts}
        return ({e for e in mine if self._contacts[(account, e)].suppressed}
                | await self._store.suppressed_among(account, set(emails) - mine))

    async def save_contacts(self, contacts: Sequence[ContactState]) -> None:
        for contact in contacts:
            stored = (await self.load_contacts(contact.account, [contact.email])).get(contact.email)
            if stored is None or stored.since <= contact.since:
                self._contacts[(contact.account, contact.email)] = contact

    # -- the record directory ---------------------------------------------------------------
    async def records(self, account: str, record_ids: Sequence[str]) -> dict[str, RecordRef]:
        ids = set(record_ids)
        found: dict[str, RecordRef] = {}
        for record_id in ids:
            if (account, record_id) in self._records:
                ref = self._records[(account, record_id)]
                if ref is not None:
                    found[record_id] = ref
        rest = sorted(r for r in ids if (account, r) not in self._records)
        if rest:
            found.update(await self._store.records(account, rest))
        return found

    async def upsert_records(self, account: str, records: Sequence[RecordRef]) -> None:
        before = await self.records(account, [r.record_id for r in records])
        for ref in records:
            old = before.get(ref.record_id)
            if old is None:
                new = replace(ref, eligible=False, eligible_at=None, email_since=None)
            else:
                moved = bool(old.email and ref.email and old.email != ref.email)
                new = replace(ref, eligible=old.eligible, eligible_at=old.eligible_at,
                              email_since=ref.email_since if moved else old.email_since)
            self._records[(account, ref.record_id)] = new
            before[ref.record_id] = new

    async def forget_records(self, account: str, record_ids: Sequence[str]) -> None:
        for record_id in record_ids:
            self._records[(account, record_id)] = None

    async def mark_eligible(self, account: str, record_ids: Iterable[str]) -> set[str]:
        unique = sorted(set(record_ids))
        known = await self.records(account, unique)
        newly = [r for r in unique if not (r in known and known[r].eligible)]
        now = datetime.now(UTC).isoformat()
        for record_id in newly:
            old = known.get(record_id) or RecordRef(record_type="contact", record_id=record_id,
                                                    email=None)
            self._records[(account, record_id)] = replace(old, eligible=True, eligible_at=now)
        self._follow_ups.add(account, newly)
        return set(newly)

    async def eligible_ids(self, account: str, record_ids: Iterable[str]) -> set[str]:
        return {r.record_id for r in (await self.records(account, list(record_ids))).values()
                if r.eligible}

    async def follow_ups(self, account: str) -> set[str]:
        stored: set[str] = await self._store.follow_ups(account)
        return self._follow_ups.view(account, stored)

    async def clear_follow_ups(self, account: str, record_ids: Iterable[str]) -> None:
        self._follow_ups.remove(account, record_ids)

    async def note_email_changes(self, account: str, changes: Sequence[EmailChange]) -> None:
        noted = {c.record_id: c for c in await self.email_changes(account)}
        for change in changes:
            old = noted.get(change.record_id)
            # a record changed twice before it was followed keeps its first old email
            kept = replace(change, old=old.old) if old is not None else change
            self._email_changes[(account, change.record_id)] = kept
            noted[change.record_id] = kept

    async def email_changes(self, account: str) -> list[EmailChange]:
        changes = {c.record_id: c for c in await self._store.email_changes(account)}
        for (a, record_id), change in self._email_changes.items():
            if a != account:
                continue
            if change is None:
                changes.pop(record_id, None)
            else:
                changes[record_id] = change
        return [changes[r] for r in sorted(changes)]

    async def clear_email_changes(self, account: str, changes: Sequence[EmailChange]) -> None:
        noted = {c.record_id: c for c in await self.email_changes(account)}
        for change in changes:
            old = noted.get(change.record_id)
            if old is not None and (old.new, old.at) == (change.new, change.at):
                self._email_changes[(account, change.record_id)] = None

    async def emails_of_records(self, account: str, record_ids: Sequence[str]) -> set[str]:
        return {r.email for r in (await self.records(account, record_ids)).values()
                if r.email is not None}

    async def records_for_emails(self, account: str,
                                 emails: Iterable[str]) -> dict[str, list[RecordRef]]:
        wanted = set(emails)
        stored: dict[str, list[RecordRef]] = await self._store.records_for_emails(account, wanted)
        refs = {r.record_id: r for refs in stored.values() for r in refs
                if (account, r.record_id) not in self._records}
        refs.update({record_id: ref for (a, record_id), ref in self._records.items()
                     if a == account and ref is not None and ref.eligible
                     and ref.email in wanted})
        found: dict[str, list[RecordRef]] = {}
        for record_id in sorted(refs):
            ref = refs[record_id]
            assert ref.email is not None
            found.setdefault(ref.email, []).append(ref)
        return found

    async def eligible_emails(self, account: str, emails: Iterable[str]) -> set[str]:
        return set(await self.records_for_emails(account, emails))

    async def upsert_subscriptions(self, account: str, rows: Sequence[SubscriptionRow]) -> None:
        current = await self.subscriptions_for(
            account, [(r.record_id, r.preference_row_id) for r in rows])
        by_id = {row.subscription_id: row for row in current.values()}
        by_id.update({sid: row for (a, sid), row in self._subscriptions.items()
                      if a == account and row is not None})
        for row in rows:
            old = by_id.get(row.subscription_id)
            if old is not None:
                if row.version < old.version:
                    continue
                row = replace(old, opted_in=row.opted_in, version=row.version,
                              modified=row.modified)
            self._subscriptions[(account, row.subscription_id)] = row
            by_id[row.subscription_id] = row

    async def forget_subscriptions(self, account: str, subscription_ids: Sequence[str]) -> None:
        for subscription_id in subscription_ids:
            self._subscriptions[(account, subscription_id)] = None

    async def subscriptions_for(self, account: str, pairs: Sequence[tuple[str, str]]
                                ) -> dict[tuple[str, str], SubscriptionRow]:
        wanted = set(pairs)
        stored = await self._store.subscriptions_for(account, pairs)
        found = {pair: row for pair, row in stored.items()
                 if (account, row.subscription_id) not in self._subscriptions}
        for (a, _), row in self._subscriptions.items():
            if a == account and row is not None \
                    and (pair := (row.record_id, row.preference_row_id)) in wanted:
                found[pair] = row
        return found

    async def defer_writes(self, account: str, keys: Iterable[tuple[int, str]]) -> None:
        self._deferred.add(account, keys)

    async def deferred_emails(self, account: str, preference_id: int) -> list[str]:
        stored = [(preference_id, e) for e in
                  await self._store.deferred_emails(account, preference_id)]
        return sorted(e for p, e in self._deferred.view(account, stored) if p == preference_id)

    async def clear_deferred(self, account: str, preference_id: int,
                             emails: Sequence[str]) -> None:
        self._deferred.remove(account, [(preference_id, e) for e in emails])

    def deferred_now(self) -> set[tuple[str, tuple[int, str]]]:
        """Dotdigital writes this view deferred and did not release."""
        return set(self._deferred.added)

    # -- parked observations, resubscriptions -----------------------------------------------
    async def park_observations(self, observations: Sequence[Observation]) -> None:
        current = {(o.key.preference_id, o.side): o
                   for o in await self.parked_observations(
                       observations[0].key.account, {o.key.email for o in observations})
                   } if observations else {}
        for observation in observations:
            key = observation.key
            slot = (key.account, key.email, key.preference_id, observation.side)
            old = self._parked.get(slot) or (
                current.get((key.preference_id, observation.side))
                if (key.account, key.email) not in self._unparked else None)
            if old is None or _newer(observation, old):
                self._parked[slot] = observation

    async def parked_observations(
            self, account: str, emails: Iterable[str], *,
            unplaced: Callable[[Observation], Observation] | None = None) -> list[Observation]:
        wanted = set(emails)
        stored = list(await self._store.parked_observations(
            account, [e for e in wanted if (account, e) not in self._unparked],
            unplaced=unplaced))
        found: dict[tuple[str, int, str], Observation] = {
            (o.key.email, o.key.preference_id, o.side): o for o in stored}
        for (a, email, preference_id, side), observation in self._parked.items():
            if a == account and email in wanted:
                found[(email, preference_id, side)] = observation
        return sorted(found.values(), key=lambda o: o.origin_time)

    async def unpark_observations(self, account: str, emails: Iterable[str]) -> None:
        for email in set(emails):
            self._unparked.add((account, email))
            for slot in [s for s in self._parked if s[:2] == (account, email)]:
                del self._parked[slot]

    async def mark_resuming(self, account: str, emails: Iterable[str]) -> None:
        self._resuming.add(account, emails)

    async def resuming_contacts(self, account: str, emails: Iterable[str]) -> set[str]:
        wanted = set(emails)
        stored: set[str] = await self._store.resuming_contacts(account, wanted)
        return {e for e in self._resuming.view(account, stored) if e in wanted}

    async def clear_resuming(self, account: str, emails: Iterable[str]) -> None:
        self._resuming.remove(account, emails)


def _newer(observation: Observation, than: Observation) -> bool:
    if observation.version is not None and than.version is not None:
        return observation.version > than.version
    return observation.origin_time > than.origin_time
