"""Property tests of the register: convergence to last-writer-wins under any delivery order,
monotonic time, the tie rule, and echo recognition."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from common.domain import (
    KeyState,
    Observation,
    Outcome,
    find_echo,
    lww_rank,
    reconcile,
    record_write,
    settle,
    whole_second,
)
from tests.unit.domain.builders import KEY, T0, at, examples, obs

FAST = examples(100)

dynamics_histories = st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=6)
dotdigital_histories = st.lists(st.tuples(st.booleans(), st.integers(1, 2500)), max_size=6)


def _histories(dyn: list[tuple[bool, int]], dd: list[tuple[bool, int]]) -> list[Observation]:
    """Per-side histories as the pollers would read them: Dynamics whole seconds with rising
    versions (several changes may share a second), dotdigital strictly rising milliseconds."""
    out: list[Observation] = []
    t = T0
    for i, (value, gap) in enumerate(dyn):
        t += timedelta(seconds=gap)
        out.append(Observation(key=KEY, side="dynamics", opted_in=value, origin_time=t,
                               version=100 + i, change_id=f"dyn-{i}"))
    t = T0
    for i, (value, gap) in enumerate(dd):
        t += timedelta(milliseconds=gap)
        out.append(Observation(key=KEY, side="dotdigital", opted_in=value, origin_time=t,
                               change_id=f"dd-{i}"))
    return out


def _lww(observations: list[Observation]) -> tuple[bool, object]:
    best = max(observations, key=lambda o: lww_rank(origin_time=o.origin_time,
                                                    opted_in=o.opted_in))
    return best.opted_in, whole_second(best.origin_time)


@FAST
@given(dyn=dynamics_histories, dd=dotdigital_histories, data=st.data())
def test_any_delivery_order_converges_to_the_lww_answer(
        dyn: list[tuple[bool, int]], dd: list[tuple[bool, int]], data: st.DataObject) -> None:
    observations = _histories(dyn, dd)
    if not observations:
        return
    extra = data.draw(st.lists(st.sampled_from(observations), max_size=len(observations)))
    delivery = data.draw(st.permutations(observations + extra))
    state: KeyState | None = None
    last_second = None
    for o in delivery:
        state = reconcile(state, o).state
        assert state.register is not None
        second = whole_second(state.register.origin_time)
        assert last_second is None or second >= last_second   # (3) never goes backwards
        last_second = second
    assert state is not None and state.register is not None
    assert (state.register.opted_in, whole_second(state.register.origin_time)) == _lww(
        observations)
    # what each side is known to hold is its latest state, whatever the order
    for side in ("dynamics", "dotdigital"):
        mine = [o for o in observations if o.side == side]
        known = state.known.get(side)
        if not mine:
            assert known is None
            continue
        latest = max(mine, key=lambda o: (o.version or 0, o.origin_time))
        assert known is not None and known.opted_in == latest.opted_in
        assert known.as_of == latest.origin_time
    # and the commands left outstanding are exactly the sides that disagree with the register
    _, commands = settle(state)
    for c in commands:
        k = state.known.get(c.side)
        assert k is None or k.opted_in != state.register.opted_in


@FAST
@given(dyn_second=st.integers(0, 50), dd_ms=st.integers(0, 999), dyn_in=st.booleans(),
       dyn_first=st.booleans())
def test_a_same_second_tie_never_opts_anyone_in(dyn_second: int, dd_ms: int, dyn_in: bool,
                                                dyn_first: bool) -> None:
    dyn = obs("dynamics", dyn_in, dyn_second, version=1)
    dd = obs("dotdigital", not dyn_in, dyn_second + dd_ms / 1000)
    first, second = (dyn, dd) if dyn_first else (dd, dyn)
    d = reconcile(reconcile(None, first).state, second)
    assert d.state.register is not None and d.state.register.opted_in is False
    expected = Outcome.TIE_OPT_OUT_WON if not second.opted_in else Outcome.TIE_OPT_IN_LOST
    assert d.outcome is expected
    assert all(c.opted_in is False for c in d.commands)


@FAST
@given(start_ms=st.integers(0, 5000), length_ms=st.integers(0, 3000),
       seen_ms=st.integers(-1000, 9000), value=st.booleans(), seen_value=st.booleans())
def test_echo_recognised_by_window_exactly_inside_it(start_ms: int, length_ms: int, seen_ms: int,
                                                     value: bool, seen_value: bool) -> None:
    s = reconcile(None, obs("dynamics", value, 0, version=1)).state
    (command,) = settle(s)[1]
    start = at(start_ms / 1000) + timedelta(microseconds=250)   # a finer clock than dotdigital's
    end = at((start_ms + length_ms) / 1000) + timedelta(microseconds=250)
    s = record_write(s, command, produced_version=None, window_start=start, window_end=end,
                     written_at=end)
    seen = obs("dotdigital", seen_value, seen_ms / 1000)
    inside = start_ms <= seen_ms <= start_ms + length_ms
    assert (find_echo(s, seen) is not None) == (inside and seen_value == value)
    d = reconcile(s, seen)
    if inside and seen_value == value:
        assert d.outcome is Outcome.ECHO and d.state.register == s.register


@FAST
@given(produced=st.integers(1, 10**9), seen=st.integers(1, 10**9), value=st.booleans(),
       seen_value=st.booleans())
def test_echo_recognised_by_dataverse_version(produced: int, seen: int, value: bool,
                                              seen_value: bool) -> None:
    s = reconcile(None, obs("dotdigital", value, 0)).state
    (command,) = settle(s)[1]
    s = record_write(s, command, produced_version=produced, window_start=at(1),
                     window_end=at(2), written_at=at(2))
    o = obs("dynamics", seen_value, 1, version=seen)
    assert (find_echo(s, o) is not None) == (seen == produced and seen_value == value)
