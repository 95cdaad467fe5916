"""Write rounds (common.messaging.rounds) over the in-memory broker: the shards' batches that
arrive together are written as one, each is acked only once the round is done, a failure of
one batch's making is found by its own consumer, and a dependency's failure is retried by all.
The dotdigital writer's rounds against the simulator: several shards' changes cost one read and
one write."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from common.messaging.abc import REASON, Delivery, Outgoing
from common.messaging.envelope import WriteCommand
from common.messaging.middleware import Handled
from common.messaging.publishing import envelopes_by_shard
from common.messaging.resilience import TransientFailure
from common.messaging.rounds import Rounds
from common.messaging.topology import Topology, shard_of
from services.runtime.registry import SHARD_BATCH_BYTES, writer_batch_bytes
from tests.unit.services.support import ACCOUNT, SHARDS, Bed, bed
from tests.unit.services.test_writer import consume, scene

pytestmark = pytest.mark.anyio

QUEUES = [Topology.writes_queue(ACCOUNT, "dotdigital", s) for s in range(SHARDS)]
# long enough that a round which waited for it instead of starting when full would time out
LONG_LINGER_S = 60.0


def commands(emails: Sequence[str]) -> list[Outgoing]:
    """A write command per email, one message per shard they fall in."""
    now = datetime.now(UTC)
    return envelopes_by_shard(
        account=ACCOUNT, source="reconciler", type="write-commands",
        changes=[WriteCommand(email=e, preference_id=1, side="dotdigital", opted_in=True,
                              origin_time=now, origin_side="dynamics", change_id=f"c:{e}")
                 for e in emails],
        shards=SHARDS, run_id=None, id_seed="rounds", route="writes", side="dotdigital")


def emails_of(batch: Sequence[Delivery]) -> set[str]:
    return {c.email for d in batch for c in d.envelope.changes if isinstance(c, WriteCommand)}


def spread(count: int) -> list[str]:
    """``count`` emails that fall in every shard."""
    found = [f"person{i}@example.com" for i in range(count)]
    assert len(commands(found)) == SHARDS
    return found


class RoundWriter:
    """Records each round (the emails of each batch); fails as told; may hold a round until
    released."""

    def __init__(self, *, hold: bool = False) -> None:
        self.rounds: list[list[set[str]]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.fail: BaseException | None = None
        self.bad: str | None = None  # a round holding this email fails (a bad message)

    async def __call__(self, batches: Sequence[Sequence[Delivery]]) -> list[Handled]:
        self.rounds.append([emails_of(b) for b in batches])
        self.started.set()
        await self.release.wait()
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        if self.bad is not None and any(self.bad in emails_of(b) for b in batches):
            raise ValueError(f"cannot write {self.bad}")
        return [Handled(account=ACCOUNT, counts={"written": len(emails_of(b))})
                for b in batches]


def consume_rounds(b: Bed, rounds: Rounds) -> None:
    async def handle(batch: Sequence[Delivery]) -> None:
        await rounds.handle(batch)

    for queue in QUEUES:
        b.consume(queue, handle, service="writer")


async def test_the_shards_batches_are_written_as_one_round_and_acked_after_it(
        tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        writer = RoundWriter(hold=True)
        consume_rounds(b, Rounds(handle=writer, linger_s=LONG_LINGER_S, size=SHARDS))
        emails = spread(8)
        await b.broker.publish_many(commands(emails))

        await writer.started.wait()
        # the round is being written: nothing is acked yet
        assert b.broker.busy(*QUEUES)
        writer.release.set()
        await b.drained(*QUEUES)

        [one] = writer.rounds
        assert len(one) == SHARDS and set().union(*one) == set(emails)


async def test_a_round_is_full_with_a_batch_of_each_shard_this_replica_holds(
        tmp_path: Path) -> None:
    """A replica consuming one of the shards: the round of its batch goes at once, without
    lingering for batches that only other replicas will see (rule 1)."""
    async with bed(tmp_path) as b:
        writer = RoundWriter()
        held = QUEUES[:1]
        rounds = Rounds(handle=writer, linger_s=LONG_LINGER_S, size=lambda: len(held))

        async def handle(batch: Sequence[Delivery]) -> None:
            await rounds.handle(batch)

        b.consume(held[0], handle, service="writer")
        emails = [e for e in spread(8) if shard_of(e, SHARDS) == 0]
        key = Topology.writes_key(ACCOUNT, "dotdigital", 0)
        await b.broker.publish_many([m for m in commands(emails) if m.routing_key == key])
        await b.drained(*held)

        [one] = writer.rounds
        assert len(one) == 1 and one[0] == set(emails)


async def test_a_lone_batch_is_written_once_the_linger_is_over(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        writer = RoundWriter()
        consume_rounds(b, Rounds(handle=writer, linger_s=0.05, size=SHARDS))
        [message] = commands(["alone@example.com"])
        await b.broker.publish_many([message])
        await b.drained(*QUEUES)
        assert writer.rounds == [[{"alone@example.com"}]]


async def test_a_bad_batch_is_found_by_its_own_consumer_and_the_others_go_through(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="prefsync.rounds")
    async with bed(tmp_path) as b:
        writer = RoundWriter()
        emails = spread(8)
        writer.bad = emails[0]
        # a short linger: the bad batch's retries are rounds of their own
        consume_rounds(b, Rounds(handle=writer, linger_s=0.02, size=SHARDS))
        await b.broker.publish_many(commands(emails))
        await b.drained(*QUEUES)

        # the round failed; each batch was then written alone: the good ones went through,
        # and the bad one was dead-lettered by its own consumer
        assert len(writer.rounds[0]) == SHARDS
        assert all(len(r) == 1 for r in writer.rounds[1:])
        bad_batch = next(r[0] for r in writer.rounds[1:] if emails[0] in r[0])
        written = {e for r in writer.rounds[1:] if emails[0] not in r[0] for e in r[0]}
        assert written == set(emails) - bad_batch
        [dead] = b.dead_letters()
        assert "cannot write" in str(dead.headers[REASON])
        # the operator is told the round went batch by batch, and why, but not whose it was
        [warning] = [r for r in caplog.records if "batches are handled one by one" in r.message]
        assert (warning.__dict__["batches"], warning.__dict__["error"]) == (SHARDS, "ValueError")
        assert emails[0] not in caplog.handler.format(warning)


async def test_a_dependency_down_fails_every_batch_and_they_meet_again(tmp_path: Path) -> None:
    async with bed(tmp_path) as b:
        writer = RoundWriter()
        writer.fail = TransientFailure("dotdigital is down", dependency="dotdigital")
        emails = spread(8)
        consume_rounds(b, Rounds(handle=writer, linger_s=LONG_LINGER_S, size=SHARDS))
        await b.broker.publish_many(commands(emails))
        await b.drained(*QUEUES)

        # no batch was written on its own: every one was retried in place, in a round again
        assert [len(r) for r in writer.rounds] == [SHARDS, SHARDS]
        assert set().union(*writer.rounds[1]) == set(emails)
        assert b.dead_letters() == []


async def test_the_dotdigital_writer_writes_several_shards_in_one_read_and_one_write(
        tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        rounds = Rounds(handle=s.writer().handle_round, linger_s=LONG_LINGER_S,
                             size=SHARDS)
        messages = await s.registers(opted_in=False)
        assert len(messages) == SHARDS  # the scene's emails fall in every shard
        before = (await s.sim.stats())["calls"]
        await s.bed.broker.publish_many(messages)
        consume(s, rounds.handle)
        await s.bed.drained(*s.queues())

        after = (await s.sim.stats())["calls"]
        calls = {route: after[route] - before.get(route, 0) for route in after
                 if after[route] != before.get(route, 0)}
        feed = "GET /v2/contacts/with-preference/{preference_id}/opt-ins-since/{date}"
        # one read of the preference's feed and one write for the round; no server-time
        assert calls.pop(feed) == 1
        assert "GET /v2/server-time" not in calls
        assert sum(n for route, n in calls.items() if route.startswith("PUT")) == (
            1 if len(s.emails) > 2 else len(s.emails))
        for email in s.emails:
            assert await s.opted_in(email) is False


def holding_the_first(counted: str) -> tuple[
        Callable[[Sequence[Sequence[Delivery]]], Awaitable[list[Handled]]],
        list[list[list[str]]], asyncio.Event, asyncio.Event]:
    """A round handler noting each round's batches (by their items' names), which holds the
    first round until ``release`` is set (``first_started`` says it is held); each batch's
    items are counted as ``counted``."""
    rounds: list[list[list[str]]] = []
    first_started, release = asyncio.Event(), asyncio.Event()

    async def handle(batches: Sequence[Sequence[Delivery]]) -> list[Handled]:
        rounds.append([[str(item) for item in batch] for batch in batches])
        if len(rounds) == 1:
            first_started.set()
            await release.wait()
        return [Handled(account=ACCOUNT, counts={counted: len(b)}) for b in batches]

    return handle, rounds, first_started, release


@pytest.mark.parametrize("short", [True, False])
async def test_while_the_budget_is_short_a_round_waits_for_the_one_being_written_and_grows(
        short: bool) -> None:
    """Rule 6: while the side's budget ran out lately, the next round does not start while one
    is being written; it takes the batches that arrive meanwhile, and is written once the
    other is done. With budget to spare, rounds overlap as before."""
    write, written, first_started, release = holding_the_first("written")
    rounds = Rounds(handle=write, linger_s=0.0, size=SHARDS,
                    budget=lambda: 0.0 if short else None)

    def batch(name: str) -> Sequence[Delivery]:
        return [name]  # type: ignore[list-item]  # the round writer only counts them

    async def ticks() -> None:
        for _ in range(10):
            await asyncio.sleep(0)  # let every ready task run (no time passes)

    first = asyncio.create_task(rounds.handle(batch("a")))
    await first_started.wait()
    second = asyncio.create_task(rounds.handle(batch("b")))
    await ticks()
    third = asyncio.create_task(rounds.handle(batch("c")))
    await ticks()
    if short:
        assert written == [[["a"]]]  # b's round waits, and c joined it
    else:
        assert written == [[["a"]], [["b"]], [["c"]]]
    release.set()
    await asyncio.gather(first, second, third)
    if short:
        assert written == [[["a"]], [["b"], ["c"]]]


async def test_serial_rounds_without_linger_go_at_once_and_gather_what_arrives_meanwhile(
        ) -> None:
    """Rule 7 (the reconciler's rounds): a batch that finds no round being handled is handled
    at once, with no linger; the batches that arrive while a round is being handled wait for
    it, and are handled together in one round."""
    handle, handled, first_started, release = holding_the_first("reconciled")
    rounds = Rounds(handle=handle, linger_s=0.0, size=SHARDS, serial=True)
    first = asyncio.create_task(rounds.handle(["a"]))  # type: ignore[list-item]
    await first_started.wait()  # at once: nothing else was being handled
    later = [asyncio.create_task(rounds.handle([name]))  # type: ignore[list-item]
             for name in ("b", "c", "d")]
    for _ in range(10):
        await asyncio.sleep(0)  # let every ready task run (no time passes)
    assert handled == [[["a"]]]
    release.set()
    results = await asyncio.gather(first, *later)
    assert handled == [[["a"]], [["b"], ["c"], ["d"]]]
    assert [r.counts for r in results] == [{"reconciled": 1}] * 4
    # idle again: the next batch goes at once, alone
    await rounds.handle(["e"])  # type: ignore[list-item]
    assert handled[-1] == [["e"]]


async def test_a_serial_round_takes_no_more_batches_once_it_holds_max_bytes() -> None:
    """Rule 8: a round whose batches' bodies hold ``max_bytes`` takes no more; the next batch
    opens the next round, and the rounds are handled one at a time in the order they
    opened (rule 7)."""
    handled: list[list[str]] = []
    first_started, release = asyncio.Event(), asyncio.Event()

    async def handle(batches: Sequence[Sequence[Delivery]]) -> list[Handled]:
        handled.append([d.message_id for b in batches for d in b])
        if len(handled) == 1:
            first_started.set()
            await release.wait()
        return [Handled(account=ACCOUNT) for _ in batches]

    def batch(name: str, size: int) -> Sequence[Delivery]:
        message = Outgoing(exchange="", routing_key="", body=b"x" * size, message_id=name)
        return [Delivery(envelope=None, message=message, queue="q")]  # type: ignore[arg-type]

    rounds = Rounds(handle=handle, linger_s=0.0, size=SHARDS, serial=True, max_bytes=150)
    first = asyncio.create_task(rounds.handle(batch("a", 10)))
    await first_started.wait()
    later = [asyncio.create_task(rounds.handle(batch(name, 100))) for name in "bcd"]
    for _ in range(10):
        await asyncio.sleep(0)  # let every ready task run (no time passes)
    release.set()
    await asyncio.gather(first, *later)
    assert handled == [["a"], ["b", "c"], ["d"]]


async def test_while_the_budget_is_short_a_round_waits_until_a_call_could_go() -> None:
    """Rule 6: with nothing being written, a round whose calls would wait for the budget waits
    for it, and takes the batches that arrive meanwhile."""
    written: list[list[list[str]]] = []
    budget_back = asyncio.Event()

    async def write(batches: Sequence[Sequence[Delivery]]) -> list[Handled]:
        written.append([[str(item) for item in batch] for batch in batches])
        return [Handled(account=ACCOUNT, counts={"written": len(b)}) for b in batches]

    rounds = Rounds(handle=write, linger_s=0.0, size=SHARDS,
                    budget=lambda: 0.0 if budget_back.is_set() else 0.01)
    first = asyncio.create_task(rounds.handle(["a"]))  # type: ignore[list-item]
    for _ in range(10):
        await asyncio.sleep(0)
    second = asyncio.create_task(rounds.handle(["b"]))  # type: ignore[list-item]
    for _ in range(10):
        await asyncio.sleep(0)
    assert written == []
    budget_back.set()
    await asyncio.gather(first, second)
    assert written == [[["a"], ["b"]]]


@pytest.mark.parametrize("held", [8, 4, 3, 2, 1])
def test_a_replica_holding_fewer_shards_takes_more_of_each(held: int) -> None:
    """Its rounds (a batch of each shard it holds) stay as big as one replica's holding all 8
    shards: 8 x SHARD_BATCH_BYTES in all."""
    taken = writer_batch_bytes(held=lambda: held, shards=8)
    assert taken == SHARD_BATCH_BYTES * 8 // held
    assert 0 <= SHARD_BATCH_BYTES * 8 - held * taken < held
