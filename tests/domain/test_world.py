"""The simulated world (see ``world.py``): whatever the interleaving, at quiescence both sides
and the register hold the last writer's value, our own writes never become the register, and
the register's time never goes backwards."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.domain.builders import examples
from tests.domain.world import World

sides = st.sampled_from(["dynamics", "dotdigital"])
actions = st.lists(st.one_of(
    st.tuples(st.just("user"), sides, st.booleans(), st.integers(1, 3000)),
    st.tuples(st.just("poll"), sides),
    st.tuples(st.just("reconcile"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("start"), st.integers(0, 3), st.booleans(), st.integers(1, 1500)),
    st.tuples(st.just("land"), st.booleans(), st.integers(1, 1500)),
    st.tuples(st.just("confirm")),
    st.tuples(st.just("tick"), st.integers(1, 4000)),
), min_size=10, max_size=80)


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
            case ("tick", ms):
                world.tick(ms)  # type: ignore[arg-type]
    world.quiesce()
    world.check_converged()
    return world


@examples(150)
@given(steps=actions)
def test_the_world_converges_to_the_last_writer(steps: list[tuple[object, ...]]) -> None:
    run(steps)
