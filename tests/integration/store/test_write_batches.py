"""Write batches (common.store.write_batches), SQLite and PostgreSQL alike: a round's writes
begun as one row are seen in flight by every read of key states, from the same snapshot, until
the save that records their outcome ends the batch; a record a reader saved into a state is
not given twice; erasing an email takes its writes out of a batch shared with others, and
a batch read before the erasure is not seen as it was after it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from common.domain import KeyState, PreferenceKey, Register, WriteCommand
from common.domain.clock import to_us
from common.domain.kernel_writes import abandon_write_row, record_write_row
from common.domain.rows import EMPTY_STATE, command_row, key_tuple, state_row
from common.domain.sides import SIDE_CODES
from common.store import LedgerStore
from common.store.batch_reads import BatchReads
from common.store.write_batches import WriteBatch
from tests.harness.keys import T, key

pytestmark = pytest.mark.anyio

START = T + timedelta(seconds=5)


def command(k: PreferenceKey, *, opted_in: bool = False) -> WriteCommand:
    return WriteCommand(key=k, side="dotdigital", opted_in=opted_in, origin_time=T,
                        origin_side="dynamics", change_id=f"dyn:{k.email}:{k.preference_id}")


def batch(batch_id: str, *keys: PreferenceKey, account: str = "acme") -> WriteBatch:
    return WriteBatch(account=account, id=batch_id, side=SIDE_CODES["dotdigital"],
                      window_start_us=to_us(START), began_at_us=to_us(START),
                      writes={key_tuple(k): command_row(command(k)) for k in keys})


def registered(k: PreferenceKey) -> KeyState:
    return KeyState(key=k, register=Register(opted_in=False, origin_time=T,
                                             origin_side="dynamics", change_id="dyn:1"))


def in_flight(state: KeyState) -> list[bool]:
    """The value of each dotdigital write in flight."""
    return [r.opted_in for r in state.writes.dotdigital if r.in_flight]


async def test_every_read_of_a_key_sees_its_writes_in_flight(store: LedgerStore) -> None:
    ann, bob, new = key(email="ann@example.com"), key(email="bob@example.com"), key(
        email="new@example.com")
    await store.save([(None, registered(ann), None), (None, registered(bob), None)])
    await store.begin_writes(batch("b1", ann, new))
    assert in_flight((await store.load([ann]))[ann]) == [False]
    assert in_flight((await store.load([bob]))[bob]) == []
    rows = await store.load_rows([key_tuple(ann), key_tuple(bob), key_tuple(new)])
    assert [r[1] for r in rows[key_tuple(ann)].writes[1]] == [to_us(T)]
    assert rows[key_tuple(ann)].revision == 1  # the stored row's: the batch changed no row
    # a key not stored yet: its write in flight on an empty state, as a begin saved it
    assert rows[key_tuple(new)].revision == 0 and rows[key_tuple(new)].writes[1]
    snapshot = await store.read_batch(BatchReads(account="acme", states_of=[key_tuple(ann)]))
    assert snapshot.states[key_tuple(ann)] == rows[key_tuple(ann)]
    assert [b.id for b in snapshot.write_batches] == ["b1"]
    assert set(snapshot.write_batches[0].keys) == {key_tuple(ann), key_tuple(new)}
    (by_email,) = await store.states_for_email("acme", "ann@example.com")
    assert in_flight(by_email) == [False]
    # the batch is the account's: the same email elsewhere has nothing in flight
    assert await store.load([key(email="ann@example.com", account="other")]) == {}


async def test_the_save_recording_the_outcome_ends_the_batch(store: LedgerStore) -> None:
    ann = key(email="ann@example.com")
    await store.save([(None, registered(ann), None)])
    await store.begin_writes(batch("b1", ann))
    (k, loaded), = (await store.load_rows([key_tuple(ann)])).items()
    end = START + timedelta(seconds=1)
    written = record_write_row(loaded, command_row(command(ann)), produced_version=None,
                               window_start_us=to_us(START), window_end_us=to_us(end),
                               written_at_us=to_us(end))
    await store.save_rows([(loaded.revision, k, written)], ended_batches=[("acme", "b1")])
    state = (await store.load([ann]))[ann]
    assert in_flight(state) == [] and [r.window_end for r in state.writes.dotdigital] == [end]
    snapshot = await store.read_batch(BatchReads(account="acme", states_of=[k]))
    assert snapshot.write_batches == []


async def test_a_batch_never_sent_ends_with_its_records_forgotten(store: LedgerStore) -> None:
    """Rule 6: a round that failed before its vendor call forgets its writes' records and ends
    its batch in one save; another's batch stays, and a batch gone already (folded) is ended
    again harmlessly."""
    ann, bob = key(email="ann@example.com"), key(email="bob@example.com")
    await store.save([(None, registered(ann), None), (None, registered(bob), None)])
    await store.begin_writes(batch("b1", ann))
    await store.begin_writes(batch("b2", bob))
    (k, loaded), = (await store.load_rows([key_tuple(ann)])).items()
    forgotten = abandon_write_row(loaded, command_row(command(ann)))
    await store.save_rows([(loaded.revision, k, forgotten)],
                          ended_batches=[("acme", "b1"), ("acme", "gone")])
    assert in_flight((await store.load([ann]))[ann]) == []
    assert in_flight((await store.load([bob]))[bob]) == [False]
    snapshot = await store.read_batch(BatchReads(account="acme", states_of=[key_tuple(ann)]))
    assert [b.id for b in snapshot.write_batches] == ["b2"]


async def test_a_record_saved_into_the_state_is_not_given_twice(store: LedgerStore) -> None:
    """A reader saves a state it read with the write in flight: the record is the state's
    own then, and the batch adds no second one."""
    ann = key(email="ann@example.com")
    await store.save([(None, registered(ann), None)])
    await store.begin_writes(batch("b1", ann))
    (k, loaded), = (await store.load_rows([key_tuple(ann)])).items()
    await store.save_rows([(loaded.revision, k, loaded)])
    assert in_flight((await store.load([ann]))[ann]) == [False]
    await store.save_rows([(2, k, state_row(registered(ann)))], ended_batches=[("acme", "b1")])
    assert in_flight((await store.load([ann]))[ann]) == []


async def test_erasing_an_email_takes_its_writes_out_of_a_shared_batch(
        store: LedgerStore) -> None:
    ann, bob = key(email="ann@example.com"), key(email="bob@example.com")
    await store.begin_writes(batch("b1", ann, bob))
    assert key_tuple(ann) in await store.load_rows([key_tuple(ann)])  # read (and decoded) once
    assert (await store.personal_data("acme", "ann@example.com"))["write_batches"] == 1
    removed = await store.forget_email("acme", "ann@example.com")
    assert removed["write_batches"] == 1
    rows = await store.load_rows([key_tuple(ann), key_tuple(bob)])
    assert key_tuple(ann) not in rows
    assert rows[key_tuple(bob)].writes[1] and rows[key_tuple(bob)] != EMPTY_STATE
    assert (await store.personal_data("acme", "bob@example.com"))["write_batches"] == 1
