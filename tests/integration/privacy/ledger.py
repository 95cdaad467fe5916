"""A ledger holding something of every kind for a few people, to erase and prune."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from common.domain import (
    ContactState,
    HistoryEntry,
    KeyState,
    Known,
    Observation,
    PendingWrite,
    PerSide,
    PreferenceKey,
    Register,
    WriteCommand,
    WriteRecord,
)
from common.domain.clock import to_us
from common.domain.rows import command_row, key_tuple
from common.domain.sides import SIDE_CODES
from common.store import LedgerStore
from common.store.directory import EmailChange, RecordRef, SubscriptionRow
from common.store.write_batches import WriteBatch

T = datetime(2026, 3, 1, 9, 0, 0, tzinfo=UTC)
PREFERENCES = (1001, 1002)


def state(key: PreferenceKey) -> KeyState:
    """A key state with a register, knowledge of both sides (dotdigital still holding an
    older value: a write to it is outstanding), a pending write and a write record (the
    write ledger)."""
    return KeyState(
        key=key,
        register=Register(opted_in=False, origin_time=T, origin_side="dotdigital",
                          change_id="dd:1"),
        known=PerSide(dynamics=Known(opted_in=False, as_of=T, version=7),
                      dotdigital=Known(opted_in=True, as_of=T - timedelta(days=1))),
        pending=PerSide(dynamics=PendingWrite(opted_in=False, origin_time=T), dotdigital=None),
        writes=PerSide(dynamics=(WriteRecord(side="dynamics", opted_in=False,
                                             register_origin_time=T, window_start=T,
                                             window_end=T + timedelta(seconds=1),
                                             produced_version=8,
                                             written_at=T + timedelta(seconds=1)),),
                       dotdigital=()),
    )


def history(key: PreferenceKey, decision: str, recorded: datetime) -> HistoryEntry:
    return HistoryEntry(account=key.account, email=key.email, preference_id=key.preference_id,
                        side="dotdigital", opted_in=False, origin_time=T, change_id=decision,
                        decision=decision, recorded_at=recorded)


async def hold(store: LedgerStore, *, account: str, email: str, record: str,
               recorded: datetime = T) -> None:
    """Everything the ledger can hold for one person: key states with their history, writes
    to them in flight (a write batch), the contact state, parked observations, a
    resubscription whose writes are owed, a deferred write, a directory record (eligible, its
    follow-up owed, an email change to it not yet followed) and its subscription row."""
    keys = [PreferenceKey(account=account, email=email, preference_id=p) for p in PREFERENCES]
    await store.save([(None, state(k), history(k, "applied", recorded)) for k in keys],
                     history=[history(keys[0], "written", recorded)])
    await store.begin_writes(WriteBatch(
        account=account, id=f"batch-{email}", side=SIDE_CODES["dotdigital"],
        window_start_us=to_us(T), began_at_us=to_us(T),
        writes={key_tuple(k): command_row(WriteCommand(
            key=k, side="dotdigital", opted_in=False, origin_time=T, origin_side="dynamics",
            change_id="dyn:1")) for k in keys}))
    await store.save_contacts([ContactState(account=account, email=email, status="Subscribed",
                                            since=T)])
    await store.park_observations([Observation(key=k, side="dynamics", opted_in=True,
                                               origin_time=T, version=3, change_id="dyn:1")
                                   for k in keys])
    await store.mark_resuming(account, [email])
    await store.defer_writes(account, [(PREFERENCES[0], email)])
    await store.upsert_records(account, [RecordRef(record_type="contact", record_id=record,
                                                   email=email)])
    await store.mark_eligible(account, [record])
    await store.note_email_changes(account, [EmailChange(
        record_id=record, old=f"before.{email}", new=email, at="2026-01-02T03:04:05Z")])
    await store.upsert_subscriptions(account, [SubscriptionRow(
        subscription_id=f"sub-{record}", record_id=record, preference_row_id="row-1001",
        opted_in=False, version=8)])
