"""reconciler: folds changes from both sides into the ledger and emits write commands.

For each batch of messages from one shard queue (one consumer per shard at a time, so one email
is never handled by two reconcilers at once), it loads the affected keys, applies every change
in order with the pure rules of :mod:`common.domain`, commits the new states and their history
in one compare-and-set transaction, publishes the write commands (confirmed) and only then lets
the messages be acked. A crash between commit and publish loses nothing: the redelivered
messages are duplicates whose outstanding writes are emitted again, with the same message ids.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from common import domain
from common.broker import Delivery, Outgoing, Publisher
from common.domain import (
    ContactState,
    HistoryEntry,
    KeyState,
    Observation,
    PreferenceKey,
    apply_contact_status,
    reconcile,
)
from common.messages import ContactStatusChange, PreferenceChange, ReadComplete
from common.messages import WriteCommand as WriteMessage
from common.store import ConflictError
from common.topology import SIDES, shard_of
from services.publishing import envelopes_by_shard, publish_progress

log = logging.getLogger("prefsync.reconciler")

SERVICE = "reconciler"
MAX_CONFLICT_RETRIES = 5


def to_message(command: domain.WriteCommand) -> WriteMessage:
    return WriteMessage(email=command.key.email, preference_id=command.key.preference_id,
                        side=command.side, opted_in=command.opted_in,
                        origin_time=command.origin_time, origin_side=command.origin_side,
                        change_id=command.change_id)


@dataclass
class BatchResult:
    states: dict[PreferenceKey, KeyState]
    contacts: dict[str, ContactState]
    history: list[HistoryEntry] = field(default_factory=list)
    # per delivery: outcome counts, and the keys whose commands it is responsible for
    outcomes: dict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    owner: dict[PreferenceKey, int] = field(default_factory=dict)
    changed_keys: set[PreferenceKey] = field(default_factory=set)
    changed_contacts: set[str] = field(default_factory=set)
    # preference ids whose complete dotdigital read ended in this batch (this shard)
    markers: list[ReadComplete] = field(default_factory=list)
    owner_of_marker: dict[int, int] = field(default_factory=dict)


class Reconciler:
    def __init__(self, *, account: str, store: Any, publisher: Publisher, shards: int,
                 on_outcome: Any = None) -> None:
        self.account = account
        self._store = store
        self._publisher = publisher
        self._shards = shards
        self._on_outcome = on_outcome
        self._read_marks: dict[tuple[int, int], str] = {}

    async def handle(self, batch: Sequence[Delivery]) -> None:
        for attempt in range(MAX_CONFLICT_RETRIES):
            result = await self._fold(batch)
            try:
                await self._store.save(
                    [(result.states[k].revision or None, result.states[k], None)
                     for k in result.changed_keys], history=result.history)
                break
            except ConflictError:
                # Another replica committed one of these keys first (only while shards move
                # between replicas): fold again on top of what it wrote.
                log.info("ledger conflict, folding again", extra={"account": self.account,
                                                                  "attempt": attempt + 1})
        else:
            raise RuntimeError("ledger conflicts did not settle")
        if result.changed_contacts:
            # Contact states are monotonic in their own time, so they need no compare-and-set.
            await self._store.save_contacts([result.contacts[e] for e in result.changed_contacts])
        await self._emit(batch, result)

    async def _fold(self, batch: Sequence[Delivery]) -> BatchResult:
        account = self.account
        emails = {c.email for d in batch for c in d.envelope.changes
                  if isinstance(c, PreferenceChange | ContactStatusChange)}
        keys = {PreferenceKey(account=account, email=c.email, preference_id=c.preference_id)
                for d in batch for c in d.envelope.changes if isinstance(c, PreferenceChange)}
        from_dotdigital = {c.email for d in batch if d.envelope.source == "dotdigital"
                           for c in d.envelope.changes if isinstance(c, PreferenceChange)}
        result = BatchResult(states=await self._store.load(keys),
                             contacts=await self._store.load_contacts(account, emails))
        eligible = await self._store.eligible_emails(account, from_dotdigital)
        now = datetime.now(UTC)
        for index, delivery in enumerate(batch):
            side: domain.Side = ("dynamics" if delivery.envelope.source == "dynamics"
                                 else "dotdigital")
            for change in delivery.envelope.changes:
                if isinstance(change, ReadComplete):
                    result.markers.append(change)
                    result.owner_of_marker[change.preference_id] = index
                    continue
                if isinstance(change, ContactStatusChange):
                    self._contact(result, change)
                    continue
                if not isinstance(change, PreferenceChange):
                    continue
                key = PreferenceKey(account=account, email=change.email,
                                    preference_id=change.preference_id)
                observation = Observation(key=key, side=side, opted_in=change.opted_in,
                                          origin_time=change.origin_time, version=change.version,
                                          change_id=change.change_id)
                if side == "dotdigital" and change.email not in eligible:
                    # Never in an email-activated list in Dynamics: not read into the ledger.
                    result.outcomes[index]["ineligible"] += 1
                    continue
                decision = reconcile(result.states.get(key), observation,
                                     contact=result.contacts.get(change.email))
                outcome = str(decision.outcome)
                result.outcomes[index][outcome] += 1
                if decision.changed:
                    result.states[key] = decision.state
                    result.changed_keys.add(key)
                if decision.outcome != domain.Outcome.DUPLICATE:
                    result.history.append(HistoryEntry.for_observation(
                        observation, decision=outcome, recorded_at=now))
                # The last delivery to touch a key publishes its outstanding writes.
                result.owner[key] = index
                if self._on_outcome is not None:
                    self._on_outcome(account, outcome)
        return result

    def _contact(self, result: BatchResult, change: ContactStatusChange) -> None:
        try:
            decision = apply_contact_status(result.contacts.get(change.email),
                                            account=self.account, email=change.email,
                                            status=change.status, as_of=change.origin_time)
        except ValueError:
            log.warning("unknown dotdigital contact status %r ignored", change.status,
                        extra={"account": self.account})
            return
        if decision.changed:
            result.contacts[change.email] = decision.state
            result.changed_contacts.add(change.email)

    async def _emit(self, batch: Sequence[Delivery], result: BatchResult) -> None:
        """Publish the outstanding writes of every touched key, then report progress.

        A write to dotdigital for a key whose dotdigital state is unknown waits until a complete
        read of that preference's feed has been reconciled in this shard (its marker); until
        then dotdigital may hold a newer value we have not seen. After the marker, unknown
        means "never set" for emails that were eligible when the read was reconciled; for
        others the writer reads the contact first.
        """
        shard = int(batch[0].queue.rsplit(".", 1)[-1]) if batch else 0
        per_delivery: dict[int, list[WriteMessage]] = defaultdict(list)
        to_defer: list[tuple[int, str]] = []
        marker_owner = result.owner_of_marker
        for marker in result.markers:
            await self._store.set_checkpoint(
                self.account, f"reconciler:read:{marker.preference_id}:{shard}",
                datetime.now(UTC).isoformat())
            self._read_marks.pop((marker.preference_id, shard), None)
            deferred = [e for e in await self._store.deferred_emails(self.account,
                                                                     marker.preference_id)
                        if shard_of(e, self._shards) == shard]
            keys = {PreferenceKey(account=self.account, email=e,
                                  preference_id=marker.preference_id) for e in deferred}
            result.states.update(await self._store.load(keys - set(result.states)))
            for key in keys:
                result.owner[key] = marker_owner[marker.preference_id]
            await self._store.clear_deferred(self.account, marker.preference_id, deferred)
        unknown_dd: dict[PreferenceKey, domain.WriteCommand] = {}
        for key, index in result.owner.items():
            state = result.states.get(key)
            if state is None:
                continue
            contact = result.contacts.get(key.email)
            if contact is not None and contact.suppressed:
                continue
            for command in domain.outstanding(state):
                if command.side == "dotdigital" and state.known.get("dotdigital") is None:
                    unknown_dd[key] = command
                else:
                    per_delivery[index].append(to_message(command))
        if unknown_dd:
            records = await self._store.records_for_emails(self.account,
                                                           {k.email for k in unknown_dd})
            for key, command in unknown_dd.items():
                read_at = await self._read_mark(key.preference_id, shard)
                if read_at is None:
                    to_defer.append((key.preference_id, key.email))
                    continue
                eligible_at = min((r.eligible_at or "" for r in records.get(key.email, [])),
                                  default="")
                covered = bool(eligible_at) and eligible_at <= read_at
                per_delivery[result.owner[key]].append(
                    replace(to_message(command), covered=covered))
        if to_defer:
            await self._store.defer_writes(self.account, to_defer)
        for index, delivery in enumerate(batch):
            commands = per_delivery.get(index, [])
            outgoing: list[Outgoing] = []
            for side in SIDES:
                outgoing += envelopes_by_shard(
                    account=self.account, source="reconciler", type="write-commands",
                    changes=[c for c in commands if c.side == side], shards=self._shards,
                    run_id=delivery.envelope.run_id, id_seed=f"w:{delivery.message_id}:{side}",
                    route="writes", side=side)
            await self._publisher.publish_many(outgoing)
            if delivery.envelope.run_id:
                await publish_progress(
                    self._publisher, account=self.account, run_id=delivery.envelope.run_id,
                    event="reconciled", fields={
                        "message": delivery.message_id,
                        "changes": len(delivery.envelope.changes),
                        "outcomes": dict(result.outcomes.get(index, {})),
                        "writes": [o.message_id for o in outgoing]})

    async def _read_mark(self, preference_id: int, shard: int) -> str | None:
        """When this shard reconciled a complete read of the preference (cached once known)."""
        mark = self._read_marks.get((preference_id, shard))
        if mark is None:
            mark = await self._store.get_checkpoint(
                self.account, f"reconciler:read:{preference_id}:{shard}")
            if mark is not None:
                self._read_marks[(preference_id, shard)] = mark
        return mark
