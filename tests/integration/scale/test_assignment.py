"""The shard assignment every replica computes from the same membership."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from common.domain import SIDES
from common.messaging.topology import Topology
from services.runtime.assignment import assign, holders


def writer_queues(account: str, shards: int) -> list[str]:
    return [Topology.writes_queue(account, side, s) for side in SIDES for s in range(shards)]


@given(shards=st.integers(1, 64), replicas=st.integers(1, 12))
def test_every_queue_has_one_replica_and_the_spread_is_even(shards: int, replicas: int) -> None:
    queues = [Topology.changes_queue("acme", s) for s in range(shards)]
    members = [f"r{i}" for i in range(replicas)]
    assigned = assign(group="reconciler/acme", queues=queues, members=members)
    assert set(assigned) == set(queues)
    load = Counter(assigned.values())
    assert max(load.values()) - min(load.values(), default=0) <= 1
    assert len(load) == min(shards, replicas)


def test_every_replica_computes_the_same_answer_in_any_order() -> None:
    queues = writer_queues("acme", 8)
    a = assign(group="writer/acme", queues=queues, members=["r3", "r1", "r2"])
    b = assign(group="writer/acme", queues=list(reversed(queues)), members=["r2", "r3", "r1", "r1"])
    assert a == b


def test_each_side_of_the_writer_spreads_over_the_replicas() -> None:
    """Shards >= replicas: every writer replica gets work on both sides."""
    assigned = assign(group="writer/acme", queues=writer_queues("acme", 4),
                      members=["r1", "r2", "r3", "r4"])
    for side in SIDES:
        owners = {m for q, m in assigned.items() if f".writes.{side}." in q}
        assert owners == {"r1", "r2", "r3", "r4"}


def test_small_accounts_do_not_all_land_on_one_replica() -> None:
    members = [f"r{i}" for i in range(4)]
    owners = {assign(group=f"reconciler/acct-{n}", queues=[Topology.changes_queue(f"acct-{n}", 0)],
                     members=members)[Topology.changes_queue(f"acct-{n}", 0)] for n in range(20)}
    assert len(owners) > 1


def test_a_departed_replica_s_queues_go_to_the_others() -> None:
    queues = [Topology.changes_queue("acme", s) for s in range(6)]
    before = assign(group="reconciler/acme", queues=queues, members=["r1", "r2", "r3"])
    after = assign(group="reconciler/acme", queues=queues, members=["r1", "r3"])
    assert set(after.values()) == {"r1", "r3"}
    assert {q for q, m in before.items() if m == "r2"} <= set(after)


def test_holders_reads_back_what_members_reported() -> None:
    assert holders({"r1": '["q1", "q2"]', "r2": '["q3"]', "r3": "[]"}) == {
        "q1": "r1", "q2": "r1", "q3": "r2"}
