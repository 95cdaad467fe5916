"""Write batches: the writes a write round begins, recorded as one row.

The writer records each write as in flight before it calls the vendor, so that its echo is
recognised whoever reads it (:func:`common.domain.writes.begin_write`). Kept in each key's
state, that record cost a rewrite of every state row of the round before the call, and another
after it (the outcome): the writer's pipeline measured 42 µs of CPU per write with that begin,
30 with no begin at all (``python -m bench.writer_cost``). So:

1. The writes a round begins are one row of ``write_batches``: the account, the side, the
   window's start (the target's clock), when the round began them (ours) and the writes (email,
   preference, value, origin time), saved in their own transaction before the vendor call.
2. Every read of key states reads the open batches of the keys' accounts from the same snapshot
   and gives each state the in-flight records of its key, with
   :func:`common.domain.kernel_writes.begin_write_row` (what the writer used to save):
   whoever reads a key sees it as if the record were in its state. A record that is in the
   state already (saved by a reader of such a state) is not added twice. A process decodes
   each batch's writes once (checked against the bytes read: only an erasure rewrites them).
3. The round's commit records each write's outcome in the states and deletes its batches in
   the same transaction: the records never vanish from view.
4. A batch of the side that a round meets when it reads the ledger is folded into the states
   by that round's commit when it holds one of the round's keys (a crashed round's, retried:
   left open, its records would be given again to states whose write is recorded), or when it
   is still open ``FOLD_AFTER_S`` after it began (its round crashed, or is slow): its keys'
   states are saved as read (with its records) and the batch is deleted in that transaction;
   from then on its records are the states' own and age as they always did. Folding a batch
   whose round still runs is harmless: its commit finds the records in the states instead
   (:meth:`services.writer.pipeline.Writer._folded`).
5. Erasing an email takes its writes out of the open batches (:mod:`common.store.personal`).
6. A round that fails before its vendor call ends its batches in a commit of its own, as it
   ends those of writes its read made needless: those writes were surely never sent, so their
   records go (left in flight, they would take a person's change of the same value for their
   echo until they expire), and an opt-in taken for their echo meanwhile is decided again
   (rule 8 of :mod:`common.domain.reconcile`). A batch folded meanwhile (rule 4) has its
   records in the states: the commit forgets them there.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from common.domain.kernel_writes import begin_write_row
from common.domain.rows import EMPTY_STATE, CommandRow, KeyTuple, StateRow

# Rule 4: a round's batch is folded this long after it began (a live round commits within
# seconds; one that waits longer than this for its vendor loses nothing by the fold).
FOLD_AFTER_S = 120.0

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS write_batches (
        account TEXT NOT NULL, id TEXT NOT NULL, side INTEGER NOT NULL,
        window_start INTEGER NOT NULL, began_at INTEGER NOT NULL, writes BLOB NOT NULL,
        PRIMARY KEY (account, id))""",
)

INSERT = ("INSERT INTO write_batches (account, id, side, window_start, began_at, writes) "
          "VALUES (?, ?, ?, ?, ?, ?)")
DELETE = "DELETE FROM write_batches WHERE account = ? AND id = ?"
# the open batches of an account (rule 2); ``account IN (...)`` for several
LIST = "SELECT account, id, side, window_start, began_at, writes FROM write_batches WHERE account"


def list_query(accounts: Iterable[str]) -> tuple[str, list[Any]]:
    """The query of the open batches of ``accounts`` (rows for :meth:`OpenWrites.of`)."""
    wanted = sorted(set(accounts))
    return f"{LIST} IN ({','.join('?' * len(wanted))})", wanted


@dataclass(frozen=True, kw_only=True, slots=True)
class WriteBatch:
    """The writes of one round begun at once, on one side (rule 1): as the writer begins them,
    or as a reader finds them open (their commands then hold what
    :func:`~common.domain.kernel_writes.begin_write_row` reads: side, value and origin)."""

    account: str
    id: str
    side: int
    window_start_us: int
    began_at_us: int
    writes: Mapping[KeyTuple, CommandRow]

    @property
    def keys(self) -> Collection[KeyTuple]:
        return self.writes.keys()

    def row(self) -> tuple[Any, ...]:
        """The batch's row, for :data:`INSERT`."""
        return (self.account, self.id, self.side, self.window_start_us, self.began_at_us,
                encode_writes(self.writes))


def encode_writes(writes: Mapping[KeyTuple, CommandRow]) -> bytes:
    """The writes as stored: ``[email, preference, value, origin]`` each (the account and the
    side are the row's)."""
    return orjson.dumps([[email, preference_id, int(row[1]), row[2]]
                         for (_, email, preference_id), row in writes.items()])


def without_email(blob: bytes, email: str) -> tuple[bytes, int]:
    """Rule 5: the stored writes without ``email``'s, and how many were taken out."""
    writes = orjson.loads(blob)
    kept = [w for w in writes if w[0] != email]
    return orjson.dumps(kept), len(writes) - len(kept)


def count_email(blob: bytes, email: str) -> int:
    return sum(1 for w in orjson.loads(blob) if w[0] == email)


# A batch's writes, decoded once in a process (a reader meets an open batch at each of its
# reads while the round runs). Stored writes change only when an erasure rewrites them, so the
# bytes read are the cache's check.
_DECODED_KEPT = 64
_decoded: OrderedDict[tuple[str, str], tuple[bytes, int, dict[KeyTuple, CommandRow]]] = (
    OrderedDict())


def _writes_of(account: str, batch_id: str, side: int, blob: bytes
               ) -> dict[KeyTuple, CommandRow]:
    found = _decoded.get((account, batch_id))
    if found is not None and found[0] == blob and found[1] == side:
        return found[2]
    writes = {(account, email, preference_id): (side, bool(opted_in), origin, side, "")
              for email, preference_id, opted_in, origin in orjson.loads(blob)}
    _decoded[(account, batch_id)] = (blob, side, writes)
    while len(_decoded) > _DECODED_KEPT:
        _decoded.popitem(last=False)
    return writes


def with_writes_in_flight(states: MutableMapping[KeyTuple, StateRow], keys: Iterable[KeyTuple],
                         rows: Iterable[Sequence[Any]]) -> list[WriteBatch]:
    """Rule 2: each of ``keys`` with writes in flight in the open batches of ``rows`` (of
    :func:`list_query`, read with ``states``) gets their records in ``states`` (a key not
    stored: on an empty state, as the writer's begin saved it); returns the batches."""
    batches = [WriteBatch(account=account, id=batch_id, side=side, window_start_us=window_start,
                          began_at_us=began_at,
                          writes=_writes_of(account, batch_id, side, bytes(blob)))
               for account, batch_id, side, window_start, began_at, blob in rows]
    holding = [batch for batch in batches if batch.writes]
    if holding:
        for key in keys:
            state: StateRow | None = None
            for batch in holding:
                command = batch.writes.get(key)
                if command is not None:
                    state = begin_write_row(states.get(key, EMPTY_STATE) if state is None
                                            else state, command,
                                            window_start_us=batch.window_start_us)
            if state is not None:
                states[key] = state
    return batches
