"""The row store's ordered index answers as a general sorted list does, under any mix of writes."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sortedcontainers import SortedList  # type: ignore[import-untyped]

from services.simulators.dynamics import sortedkeys
from services.simulators.dynamics.sortedkeys import SortedKeys

_LOW, _HIGH = "", "\uffff"


def _reads_agree(fast: SortedKeys, general: Any, rng: random.Random, keys: list[Any]) -> None:
    assert len(fast) == len(general)
    assert list(fast) == list(general)
    probes = [*rng.sample(keys, min(len(keys), 6)), None]
    for _ in range(12):
        lo, hi = rng.choice(probes), rng.choice(probes)
        inclusive = (rng.random() < 0.5, rng.random() < 0.5)
        reverse = rng.random() < 0.5
        assert (list(fast.irange(lo, hi, inclusive=inclusive, reverse=reverse))
                == list(general.irange(lo, hi, inclusive=inclusive, reverse=reverse)))
        if lo is not None:
            assert fast.bisect_left(lo) == general.bisect_left(lo)


@pytest.mark.parametrize("seed", range(6))
def test_a_random_workload_reads_as_a_sorted_list(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # small sublists, so that splits and joins happen often
    monkeypatch.setattr(sortedkeys, "LOAD", 8)
    monkeypatch.setattr(sortedkeys, "_SPLIT", 16)
    monkeypatch.setattr(sortedkeys, "_JOIN", 2)
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    seeded = [(start, f"{rng.getrandbits(64):016x}") for _ in range(rng.randrange(0, 200))]
    fast, general = SortedKeys(seeded), SortedList(seeded)
    held = list(seeded)
    clock = start
    most_sublists = 0
    for step in range(1500):
        roll = rng.random()
        if roll < 0.5 or not held:  # a write at the clock's second, the clock moving on at times
            if rng.random() < 0.1:
                clock += timedelta(seconds=1)
            stamp = clock if rng.random() < 0.95 else start + timedelta(seconds=rng.randrange(9))
            key = (stamp, f"{rng.getrandbits(64):016x}")
            fast.add(key)
            general.add(key)
            held.append(key)
        elif roll < 0.9:  # an update or delete takes a row's old entry away
            key = held.pop(rng.randrange(len(held)))
            fast.remove(key)
            general.remove(key)
        else:
            missing = (clock, "not-held")
            with pytest.raises(ValueError):
                fast.remove(missing)
        most_sublists = max(most_sublists, len(fast._lists))
        if step % 50 == 0:
            _reads_agree(fast, general, rng, [*held, (clock, _LOW), (clock, _HIGH), (start, _HIGH)])
    _reads_agree(fast, general, rng, held)
    assert most_sublists > 10  # splits and joins were exercised
    while held:  # emptied to the last key
        key = held.pop(rng.randrange(len(held)))
        fast.remove(key)
        general.remove(key)
    _reads_agree(fast, general, rng, [(start, _LOW)])


def test_an_empty_index_reads_empty() -> None:
    empty = SortedKeys()
    assert len(empty) == 0 and list(empty) == []
    assert list(empty.irange(1, 5)) == [] and list(empty.irange(reverse=True)) == []
    assert empty.bisect_left(3) == 0
    with pytest.raises(ValueError):
        empty.remove(3)


def test_versions_append_on_top_in_order() -> None:
    index = SortedKeys([(5, "a")])
    for version in range(6, 5000):
        index.add((version, "a"))
    assert [v for v, _ in index] == list(range(5, 5000))
    assert list(index.irange((10, _LOW), (13, _HIGH))) == [(v, "a") for v in range(10, 14)]


@pytest.mark.parametrize("seed", range(4))
def test_keys_added_together_are_laid_out_as_added_one_by_one(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """update (as the modifiedon index settles a second's entries) leaves the sublists and
    their largest keys as add leaves them, key by key: runs on top of every size (empty,
    longer than a sublist, filling the last one to its split), and runs that start below
    the largest key, from an empty index and from removals' leftovers."""
    monkeypatch.setattr(sortedkeys, "LOAD", 4)
    monkeypatch.setattr(sortedkeys, "_SPLIT", 8)
    monkeypatch.setattr(sortedkeys, "_JOIN", 1)
    rng = random.Random(seed)
    together, one_by_one = SortedKeys(), SortedKeys()
    held: set[int] = set()
    top = 0
    for _ in range(300):
        if rng.random() < 0.2 and held:
            for key in rng.sample(sorted(held), min(len(held), rng.randrange(1, 6))):
                held.discard(key)
                together.remove(key)
                one_by_one.remove(key)
            continue
        count = rng.choice([0, 1, 2, 7, 8, 9, 17, rng.randrange(30)])
        if rng.random() < 0.8:  # newer than all: on top
            run = list(range(top + 1, top + 1 + 3 * count, 3))
        else:  # some among the keys held
            run = sorted(set(range(top + 2 * count + 1)) - held)[-count:] if count else []
            run = sorted(rng.sample(run, min(len(run), count)))
        top = max([top, *run])
        held.update(run)
        together.update(run)
        for key in run:
            one_by_one.add(key)
        assert (together._lists, together._maxes, len(together)) == (
            one_by_one._lists, one_by_one._maxes, len(one_by_one))
    assert list(together) == sorted(held)
    assert len(together._lists) > 5  # (splits happened)
