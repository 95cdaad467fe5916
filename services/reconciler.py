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
from dataclasses import dataclass, field
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
from common.messages import ContactStatusChange, PreferenceChange
from common.messages import WriteCommand as WriteMessage
from common.store import ConflictError
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


class Reconciler:
    def __init__(self, *, account: str, store: Any, publisher: Publisher, shards: int,
                 on_outcome: Any = None) -> None:
        self.account = account
        self._store = store
        self._publisher = publisher
        self._shards = shards
        self._on_outcome = on_outcome

    async def handle(self, batch: Sequence[Delivery]) -> None:
        for attempt in range(MAX_CONFLICT_RETRIES):
            result = await self._fold(batch)
            try:
                await self._store.commit(
                    states=[result.states[k] for k in result.changed_keys],
                    contacts=[result.contacts[e] for e in result.changed_contacts],
                    history=result.history)
                break
            except ConflictError:
                # Another replica committed one of these keys first (only while shards move
                # between replicas): fold again on top of what it wrote.
                log.info("ledger conflict, folding again", extra={"account": self.account,
                                                                  "attempt": attempt + 1})
        else:
            raise RuntimeError("ledger conflicts did not settle")
        await self._emit(batch, result)

    async def _fold(self, batch: Sequence[Delivery]) -> BatchResult:
        account = self.account
        emails = {c.email for d in batch for c in d.envelope.changes}
        keys = {PreferenceKey(account=account, email=c.email, preference_id=c.preference_id)
                for d in batch for c in d.envelope.changes if isinstance(c, PreferenceChange)}
        from_dotdigital = {c.email for d in batch if d.envelope.source == "dotdigital"
                           for c in d.envelope.changes}
        result = BatchResult(states=await self._store.load(keys),
                             contacts=await self._store.load_contacts(account, emails))
        eligible = await self._store.eligible_emails(account, from_dotdigital)
        now = datetime.now(UTC)
        for index, delivery in enumerate(batch):
            side = "dynamics" if delivery.envelope.source == "dynamics" else "dotdigital"
            for change in delivery.envelope.changes:
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
        """Publish the outstanding writes of every touched key, then report progress."""
        per_delivery: dict[int, list[WriteMessage]] = defaultdict(list)
        for key, index in result.owner.items():
            state = result.states.get(key)
            if state is None:
                continue
            contact = result.contacts.get(key.email)
            if contact is not None and contact.suppressed:
                continue
            per_delivery[index].extend(to_message(c) for c in domain.outstanding(state))
        for index, delivery in enumerate(batch):
            commands = per_delivery.get(index, [])
            outgoing: list[Outgoing] = []
            for side in ("dynamics", "dotdigital"):
                outgoing += envelopes_by_shard(
                    account=self.account, source="reconciler", type="write-commands",
                    changes=[c for c in commands if c.side == side], shards=self._shards,
                    run_id=delivery.envelope.run_id, id_seed=f"w:{delivery.message_id}:{side}",
                    route="writes", side=side)  # type: ignore[arg-type]
            await self._publisher.publish_many(outgoing)
            if delivery.envelope.run_id:
                await publish_progress(
                    self._publisher, account=self.account, run_id=delivery.envelope.run_id,
                    event="reconciled", fields={
                        "message": delivery.message_id,
                        "changes": len(delivery.envelope.changes),
                        "outcomes": dict(result.outcomes.get(index, {})),
                        "writes": [o.message_id for o in outgoing]})
