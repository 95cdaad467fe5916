"""The simulated world (see ``world.py``): whatever the interleaving, at quiescence both sides
and the register hold the last writer's value, our own opt-ins never become the register (an
opt-out of ours read before its write was confirmed may: it then counts as a user change), the
writer never acts on a superseded command, and the register's time never goes backwards."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.domain.builders import examples
from tests.unit.domain.world import World

sides = st.sampled_from(["dynamics", "dotdigital"])
action = st.one_of(
    st.tuples(st.just("user"), sides, st.booleans(), st.integers(1, 3000)),
    st.tuples(st.just("poll"), sides),
    st.tuples(st.just("reconcile"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("start"), st.integers(0, 3), st.booleans(), st.integers(1, 1500)),
    st.tuples(st.just("land"), st.booleans(), st.integers(1, 1500)),
    st.tuples(st.just("confirm")),
    st.tuples(st.just("crash")),
    st.tuples(st.just("fail")),
    st.tuples(st.just("tick"), st.integers(1, 4000)),
)
actions = st.lists(action, min_size=10, max_size=80)


def run(steps: list[tuple[object, ...]]) -> World:
    world = World()
    for step in steps:
        match step:
            case ("user", side, value, gap):
                world.user(side, value, gap)  # type: ignore[arg-type]
            case ("poll", side):
                world.poll(side)  # type: ignore[arg-type]
            case ("reconcile", index, redeliver):
                world.reconcile_one(index, redeliver)  # type: ignore[arg-type]
            case ("start", index, redeliver, took):
                world.start_write(index, redeliver, took)  # type: ignore[arg-type]
            case ("land", confirm, took):
                world.land(confirm, took)  # type: ignore[arg-type]
            case ("confirm",):
                world.confirm()
            case ("crash",):
                world.crash()
            case ("fail",):
                world.fail()
            case ("tick", ms):
                world.tick(ms)  # type: ignore[arg-type]
    world.quiesce()
    world.check_converged()
    return world


@examples(150)
@given(steps=actions)
def test_the_world_converges_to_the_last_writer(steps: list[tuple[object, ...]]) -> None:
    run(steps)


def test_flip_flop_in_the_world() -> None:
    """Our stale opt-in lands on dotdigital over the person's newer opt-out (seen by a poll
    first): the opt-out still wins everywhere, whichever read the reconciler takes first."""
    for echo_first in (False, True):
        world = World()
        world.user("dynamics", True, 100)
        world.poll("dynamics")
        world.reconcile_one(0, False)
        world.start_write(0, False, took_ms=200)          # read dd (never set), begin the write
        world.user("dotdigital", False, 1500)             # the person opts out meanwhile
        world.poll("dotdigital")
        world.land(confirm=False, took_ms=300)            # our opt-in overwrites it
        world.poll("dotdigital")                          # the echo
        assert world.rows["dotdigital"].opted_in is True
        if echo_first:
            world.inbox.reverse()
        world.reconcile_one(0, False)
        world.reconcile_one(0, False)
        world.quiesce()
        world.check_converged()
        assert world.rows["dynamics"].opted_in is False
        assert world.rows["dotdigital"].opted_in is False
