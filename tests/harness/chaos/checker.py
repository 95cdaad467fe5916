"""The chaos suite's checker: a recorded history and what the world shows at the end in, a
verdict out. Pure: no I/O, so it is tested with hand-made histories.

What is expected, per key (email, preference):

1. Last writer wins over the history (:mod:`tests.harness.chaos.history`): the baseline, then
   every user edit, by the real time of the edit (the vendor's stamp less the offset set on its
   clock) at whole-second precision; in the winning second an opt-out beats an opt-in.
2. Edits on a record that never joined an email-activated list take no part; such a record is
   never written by prefsync and is not checked.
3. Every checked Dynamics record with the email, and the dotdigital contact, hold the value.
4. Where the vendors' clocks were offset, an opt-in that wins by no more than
   ``skew_tolerance_s`` over an opt-out is a tie within the clocks' uncertainty: opt-out on
   every side is accepted too (never the other way round). So is an opt-in that wins over an
   opt-out of the other side by less than a second plus the clocks' measured uncertainty (the
   product's own tie rule: the two whole-second spans, widened by it, overlap). And where a
   side's clock stepped, an opt-in that wins by no more than the step plus ``skew_tolerance_s``
   over an opt-out, either of them made within the step plus ``STEP_SLACK`` of it on that
   side: the vendor's clock stamped those times twice (or it is not known on which side of
   the step they fell), and the product ties what it cannot order.

What is counted (each key once per count):

- ``lost_opt_outs``: the expected value is opt-out, but a record or the contact shows opt-in;
  ``stale_opt_ins`` are those of them where the opt-in shown was written by prefsync (it opted
  the person back in with a stale value);
- ``missing_opt_ins``: the expected value is opt-in, but a record or the contact shows opt-out
  or nothing;
- ``other_wrong``: nothing shown where an opt-out is expected;
- ``opt_ins_lost_to_a_write_on_its_way`` (reported apart, not a failure): keys whose winning
  opt-in was made on one side while prefsync's write of an opt-out to the other side was on
  its way (it landed at most ``on_its_way_s`` after the opt-in, in its second or later), or
  too soon after it landed for the clocks to tell (the opt-in's second began less than their
  measured uncertainty after it), and that show opt-out on every side: dotdigital stamps a
  write, not a change, so that write's read back may hide a person's opt-out it restamped,
  and the product lets the opt-out win (rule 2's exception of :mod:`common.domain.reconcile`).
  Only where no vendor clock was stepped (a stamp the product places across a step ties more
  widely than this counts); the write's time is the real one the simulator journaled;
- ``opt_ins_taken_for_an_unanswered_write`` (reported apart, not a failure): keys whose
  winning opt-in was made on one side while prefsync's write of an opt-in there had gone
  unanswered (the simulator journaled it, its caller gone: it timed out), and that show
  opt-out on every side. Such a write's fate is unknown to the product, and it may land
  until the in-flight limit (:data:`common.domain.writes.IN_FLIGHT_LIMIT`) after it began:
  an opt-in read there meanwhile is taken for its echo (``is_echo``), which never opts
  anyone in. Taken for a person's, our write landing late would be a stale opt-in over the
  opt-out made before it. Only where no answered write of ours of that value to that target
  came between (which closes the record); the write's time is the real one journaled;
- ``overwritten_in_flight`` (reported apart, not a failure): keys whose wrong value is a write of
  ours that the vendor applied within ``race_window_s`` after a person changed that target the
  other way (the write was on its way before the change; see ``_overwrote_in_flight``);
- ``excess_writes``: targets (a record's row, or a contact's preference) that prefsync wrote
  more than ``2 x (edits of the key) + write_slack`` times (the vendors' journals);
- ``ineligible_writes``: prefsync writes to records that never joined a list;
- ``unexpected_dead_letters``: dead letters other than the injected poison, and
  ``poison_not_dead_lettered``;
- ``outstanding_keys``: keys the ledger still holds writes outstanding for;
- ``restarts_by_hand``: service processes that died other than at a failpoint or by the
  harness's own kill;
- whether the world converged (two sync runs in a row applied nothing), and how long it took.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from common.domain import Side
from common.domain.writes import IN_FLIGHT_LIMIT
from tests.harness.chaos.history import (
    BASELINE_AT,
    Baseline,
    Create,
    Edit,
    History,
    Join,
    Key,
    Poison,
    parse_time,
)

# Details kept per count (the counts themselves are exact).
MAX_DETAILS = 20


def _second(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


@dataclass(frozen=True, kw_only=True)
class Expectation:
    """The value a key must end with, and why."""

    opted_in: bool
    winner: Baseline | Edit
    edits: int
    # the opt-out is acceptable too (an opt-in winning inside the clocks' uncertainty)
    opt_out_acceptable: bool = False
    # the winner differs if the vendors' raw stamps are compared (their clocks were offset)
    skew_sensitive: bool = False
    # ... and an edit of the key was stamped by a clock that was off while the product could
    # not measure it at all (no clock sample of that side between the step out and back)
    unmeasured: bool = False


def _lww(contenders: Sequence[tuple[datetime, bool]]) -> tuple[datetime, bool]:
    """(winning second, value): the latest second; an opt-out wins inside it."""
    best = max(_second(at) for at, _ in contenders)
    values = {value for at, value in contenders if _second(at) == best}
    return best, (False not in values)


# How long after a step of a vendor's clock it may take to be measured (a sync or two), and how
# long before it the last sample that agreed with the old clock may be.
STEP_SLACK = timedelta(seconds=30)


@dataclass(frozen=True, kw_only=True)
class ClockStep:
    """A vendor's clock stepped by ``seconds`` at ``at`` (real time)."""

    side: Side
    at: datetime
    seconds: float
    # whether the product took a sample of the side's clock while it was off (False: the step
    # out and the step back both fell where nothing was measured)
    measured: bool = True
    back_at: datetime | None = None


def _near_step(edit: Baseline | Edit, steps: Sequence[ClockStep]) -> float | None:
    """The largest step of the edit's side's clock it was made near, if any."""
    if not isinstance(edit, Edit):
        return None
    sizes = [abs(s.seconds) for s in steps if s.side == edit.side
             and abs(edit.true_at - s.at) <= timedelta(seconds=abs(s.seconds)) + STEP_SLACK]
    return max(sizes, default=None)


def expected_values(history: History, *, skew_tolerance_s: float = 2.0,
                    uncertainty_s: float = 0.0,
                    clock_steps: Sequence[ClockStep] = ()) -> dict[Key, Expectation]:
    created = {e.record_id for e in history.of(Create)}
    joined = {e.record_id for e in history.of(Join)}
    never_joined = created - joined
    events: dict[Key, list[Baseline | Edit]] = defaultdict(list)
    for event in history:
        if isinstance(event, Baseline) or (isinstance(event, Edit)
                                           and event.record_id not in never_joined):
            events[event.key].append(event)
    out: dict[Key, Expectation] = {}
    for key, found in events.items():
        def true_at(e: Baseline | Edit) -> datetime:
            return BASELINE_AT if isinstance(e, Baseline) else e.true_at

        def raw_at(e: Baseline | Edit) -> datetime:
            return BASELINE_AT if isinstance(e, Baseline) else e.at

        best, value = _lww([(true_at(e), e.opted_in) for e in found])
        winner = next(e for e in reversed(found)
                      if _second(true_at(e)) == best and e.opted_in == value)
        edits = [e for e in found if isinstance(e, Edit)]
        skewed = any(e.offset_s for e in edits)
        skew_sensitive = skewed and _lww([(raw_at(e), e.opted_in) for e in found])[1] != value
        acceptable = False
        if value and skewed:
            rivals = [true_at(e) for e in edits if not e.opted_in]
            acceptable = any(best - _second(at) <= timedelta(seconds=skew_tolerance_s)
                             for at in rivals)
        if value and clock_steps:
            for rival in edits:
                if rival.opted_in:
                    continue
                step = max((s for s in (_near_step(winner, clock_steps),
                                        _near_step(rival, clock_steps)) if s is not None),
                           default=None)
                if step is not None and best - _second(true_at(rival)) <= timedelta(
                        seconds=step + skew_tolerance_s):
                    acceptable = True
        if value and uncertainty_s > 0 and isinstance(winner, Edit):
            band = timedelta(seconds=1 + uncertainty_s)
            acceptable = acceptable or any(
                best - _second(true_at(e)) < band for e in edits
                if not e.opted_in and e.side != winner.side)
        unmeasured = skew_sensitive and any(
            s.side == e.side and not s.measured and s.back_at is not None
            and s.at <= e.true_at <= s.back_at for e in edits for s in clock_steps)
        out[key] = Expectation(opted_in=value, winner=winner, edits=len(edits),
                               opt_out_acceptable=acceptable, skew_sensitive=skew_sensitive,
                               unmeasured=unmeasured)
    return out


@dataclass(frozen=True, kw_only=True)
class RecordView:
    """One Dynamics record as read at the end: its email and its subscription rows' values."""

    email: str | None
    values: Mapping[int, bool]


@dataclass(frozen=True, kw_only=True)
class Observed:
    """What the world shows once the faults healed and the syncs went quiet."""

    dotdigital: Mapping[str, Mapping[int, bool]]
    records: Mapping[str, RecordView]
    # preference writes as the simulators journaled them (after the baseline)
    journal: Sequence[Mapping[str, Any]] = ()
    dead_letters: Sequence[Mapping[str, Any]] = ()
    outstanding: Sequence[Key] = ()
    restarts_by_hand: Sequence[Mapping[str, Any]] = ()
    converged: bool = True
    converge_s: float | None = None
    # the two vendors' clock uncertainties as the product measured them (the widest of the run)
    clock_uncertainty_s: float = 0.0
    # the steps of the vendors' clocks (the clock-offset faults)
    clock_steps: Sequence[ClockStep] = ()


@dataclass
class Verdict:
    keys: int = 0
    changes: int = 0
    lost_opt_outs: int = 0
    stale_opt_ins: int = 0
    missing_opt_ins: int = 0
    other_wrong: int = 0
    tie_band_opt_outs: int = 0
    opt_ins_lost_to_a_write_on_its_way: int = 0
    opt_ins_taken_for_an_unanswered_write: int = 0
    # keys wrong only because a vendor's clock was off while it could not be measured
    unmeasured_skew: int = 0
    skew_sensitive_keys: int = 0
    excess_writes: int = 0
    max_writes_per_target: int = 0
    prefsync_writes: int = 0
    ineligible_writes: int = 0
    unexpected_dead_letters: int = 0
    poison_not_dead_lettered: int = 0
    outstanding_keys: int = 0
    restarts_by_hand: int = 0
    converged: bool = True
    converge_s: float | None = None
    # the two vendors' clock uncertainties as the product measured them (the widest of the run)
    clock_uncertainty_s: float = 0.0
    # why each lost opt-out was lost, as far as the journals tell: "clock skew" (the vendors'
    # raw stamps order it the other way), "overwritten by prefsync" (our write of the opt-in
    # landed on the side after the opt-out), "never delivered" (the side kept its old value)
    lost_causes: dict[str, int] = field(default_factory=dict)
    # keys where a person's change was overwritten by a write of ours already on its way (see
    # ``_overwrote_in_flight``): reported, not counted as lost or missing (no conditional
    # writes at dotdigital: the change is gone before anyone could read it)
    overwritten_in_flight: int = 0
    details: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    @property
    def problems(self) -> list[str]:
        """What failed, in words (empty: the run passed)."""
        named = [("lost_opt_outs", "lost opt-outs"), ("stale_opt_ins", "stale opt-ins"),
                 ("missing_opt_ins", "missing opt-ins"), ("other_wrong", "other wrong values"),
                 ("excess_writes", "targets written too often"),
                 ("ineligible_writes", "writes to ineligible records"),
                 ("unexpected_dead_letters", "unexpected dead letters"),
                 ("poison_not_dead_lettered", "poison not dead-lettered"),
                 ("outstanding_keys", "keys with outstanding writes"),
                 ("restarts_by_hand", "processes restarted by hand")]
        out = [f"{getattr(self, name)} {words}" for name, words in named if getattr(self, name)]
        if not self.converged:
            out.append("did not converge")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def note(self, kind: str, detail: dict[str, Any]) -> None:
        if len(self.details[kind]) < MAX_DETAILS:
            self.details[kind].append(detail)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "details"}
        out["ok"] = self.ok
        out["problems"] = self.problems
        out["details"] = {k: v for k, v in self.details.items() if v}
        return out


def _target(entry: Mapping[str, Any]) -> tuple[str, str, int]:
    side = str(entry["side"])
    who = str(entry["record_id"]) if side == "dynamics" else str(entry["email"]).lower()
    return side, who, int(entry["preference_id"])


def _user_writes(history: History) -> set[tuple[str, int]]:
    """(record id, row version) of the Dynamics edits the harness made through the API."""
    return {(e.record_id, e.version) for e in history.edits
            if e.side == "dynamics" and e.record_id is not None and e.version is not None}


def _ours(entry: Mapping[str, Any], user: set[tuple[str, int]]) -> bool:
    if entry.get("via") != "api":
        return False
    if entry["side"] == "dynamics":
        return (str(entry.get("record_id")), entry.get("version")) not in user
    return True


def _overwrote_in_flight(entries: Sequence[Mapping[str, Any]], user: set[tuple[str, int]], *,
                         window_s: float) -> bool:
    """The value a target shows was written by prefsync within ``window_s`` after a person
    changed it the other way: a write already on its way (read, decided and sent before the
    change) that the vendor applied after it. dotdigital has no conditional writes, so such a
    change is overwritten unseen."""
    *before, final = entries
    changes = [e for e in before if not _ours(e, user)]
    if not changes or changes[-1]["opted_in"] == final["opted_in"]:
        return False
    gap = parse_time(str(final["at"])) - parse_time(str(changes[-1]["at"]))
    return timedelta(0) <= gap <= timedelta(seconds=window_s)


def _real_time(entry: Mapping[str, Any]) -> datetime:
    """When a journaled write landed, in real time: the vendor's clock that stamped it may
    have been shifted."""
    return parse_time(str(entry.get("real_at") or entry["at"]))


def _lost_to_a_write_on_its_way(winner: Baseline | Edit,
                                written: Sequence[Mapping[str, Any]], *,
                                on_its_way_s: float, uncertainty_s: float) -> bool:
    """The winning opt-in was made on one side while prefsync's write of an opt-out to the
    other side (``written``: prefsync's journaled writes of the key) was on its way: it landed
    at most ``on_its_way_s`` after the opt-in, in the opt-in's second or later; or it landed
    before, but the opt-in's second began less than ``uncertainty_s`` (the clocks' measured
    uncertainty) after that (their spans overlap: a tie, which the opt-out wins)."""
    if not isinstance(winner, Edit) or not winner.opted_in:
        return False
    made = winner.at - timedelta(seconds=winner.offset_s)
    for entry in written:
        if entry["side"] == winner.side or entry["opted_in"]:
            continue
        landed = _real_time(entry)
        if landed - made > timedelta(seconds=on_its_way_s):
            continue
        if (_second(landed) >= _second(made)
                or _second(made) - landed < timedelta(seconds=uncertainty_s)):
            return True
    return False


def _taken_for_an_unanswered_write(winner: Baseline | Edit,
                                    written: Sequence[Mapping[str, Any]], *,
                                    on_its_way_s: float) -> bool:
    """The winning opt-in was made on one side while prefsync's write of an opt-in to that
    side (``written``: prefsync's journaled writes of the key, by time) was unanswered: that
    write landed no more than ``on_its_way_s`` after the opt-in (it began before it), or
    before it by less than the in-flight limit, and no answered write of ours of an opt-in to
    that target landed between (it would have closed the record)."""
    if not isinstance(winner, Edit) or not winner.opted_in:
        return False
    made = winner.at - timedelta(seconds=winner.offset_s)
    unanswered: dict[tuple[str, str, int], datetime] = {}
    for entry in written:
        if entry["side"] != winner.side or not entry["opted_in"]:
            continue
        landed = _real_time(entry)
        if landed - made > timedelta(seconds=on_its_way_s):
            continue  # began after the opt-in
        target = _target(entry)
        if entry.get("answered") is False:
            unanswered[target] = landed
        elif landed <= made:
            unanswered.pop(target, None)  # confirmed: its record is closed
    return any(made - landed < IN_FLIGHT_LIMIT for landed in unanswered.values())


def check(history: History, observed: Observed, *, write_slack: int = 3,
          skew_tolerance_s: float = 2.0, race_window_s: float = 1.0,
          on_its_way_s: float = 7.0) -> Verdict:
    verdict = Verdict(changes=len(history.edits), converged=observed.converged,
                      converge_s=observed.converge_s,
                      clock_uncertainty_s=observed.clock_uncertainty_s,
                      restarts_by_hand=len(observed.restarts_by_hand))
    for restart in observed.restarts_by_hand:
        verdict.note("restarts_by_hand", dict(restart))
    expected = expected_values(history, skew_tolerance_s=skew_tolerance_s,
                               uncertainty_s=observed.clock_uncertainty_s,
                               clock_steps=observed.clock_steps)
    verdict.keys = len(expected)
    verdict.skew_sensitive_keys = sum(1 for e in expected.values() if e.skew_sensitive)
    never_joined = ({e.record_id for e in history.of(Create)}
                    - {e.record_id for e in history.of(Join)})
    user = _user_writes(history)

    # who wrote each target last, and how often prefsync wrote it
    last: dict[tuple[str, str, int], Mapping[str, Any]] = {}
    writes_to: dict[tuple[str, str, int], list[Mapping[str, Any]]] = defaultdict(list)
    ours: Counter[tuple[str, str, int]] = Counter()
    for entry in sorted(observed.journal, key=lambda e: parse_time(str(e["at"]))):
        target = _target(entry)
        last[target] = entry
        writes_to[target].append(entry)
        if _ours(entry, user):
            ours[target] += 1
            verdict.prefsync_writes += 1
            if entry["side"] == "dynamics" and str(entry.get("record_id")) in never_joined:
                verdict.ineligible_writes += 1
                verdict.note("ineligible_writes", dict(entry))

    # prefsync's writes per key (email, preference)
    ours_of_key: dict[Key, list[Mapping[str, Any]]] = defaultdict(list)
    for target, entries in writes_to.items():
        for entry in entries:
            if _ours(entry, user) and entry.get("email"):
                ours_of_key[(str(entry["email"]).lower(), target[2])].append(entry)

    # what each side shows, per key
    shown: dict[Key, list[tuple[Side, str, bool | None]]] = defaultdict(list)
    emails = {email for email, _ in expected}
    preferences = sorted({p for _, p in expected})
    for email in emails:
        values = observed.dotdigital.get(email, {})
        for preference in preferences:
            if (email, preference) in expected:
                shown[(email, preference)].append(
                    ("dotdigital", email, values.get(preference)))
    for record_id, record in observed.records.items():
        if record_id in never_joined or record.email is None:
            continue
        for preference in preferences:
            key = (record.email, preference)
            if key in expected:
                shown[key].append(("dynamics", record_id, record.values.get(preference)))

    flagged: dict[str, set[Key]] = defaultdict(set)
    causes: dict[Key, set[str]] = defaultdict(set)
    for key, expectation in sorted(expected.items()):
        want = expectation.opted_in
        views = shown.get(key, [])
        # an opt-in expected and opt-out shown everywhere: the prices counted apart below
        opted_out = want and bool(views) and all(value is False for _, _, value in views)
        if opted_out and expectation.opt_out_acceptable:
            verdict.tie_band_opt_outs += 1  # a tie within the clocks' uncertainty
            continue
        ours_here = ours_of_key.get(key, [])
        price = ("opt_ins_lost_to_a_write_on_its_way" if opted_out and not observed.clock_steps
                 and _lost_to_a_write_on_its_way(
                     expectation.winner, ours_here, on_its_way_s=on_its_way_s,
                     uncertainty_s=observed.clock_uncertainty_s)
                 else "opt_ins_taken_for_an_unanswered_write" if opted_out
                 and _taken_for_an_unanswered_write(expectation.winner, ours_here,
                                                    on_its_way_s=on_its_way_s)
                 else None)
        if price is not None:
            setattr(verdict, price, getattr(verdict, price) + 1)
            verdict.note(price, {"email": key[0], "preference_id": key[1],
                                 "winner": _describe(expectation.winner)})
            continue
        wrong: list[tuple[list[str], dict[str, Any], bool]] = []
        for side, who, value in views:
            if value == want:
                continue
            target = (side, who, key[1])
            wrote = last.get(target)
            by_us = wrote is not None and _ours(wrote, user) and wrote["opted_in"] == value
            raced = by_us and _overwrote_in_flight(writes_to[target], user,
                                                   window_s=race_window_s)
            detail = {"email": key[0], "preference_id": key[1], "side": side, "target": who,
                      "expected": want, "shown": value, "written_by_prefsync": by_us,
                      "overwrote_in_flight": raced, "winner": _describe(expectation.winner),
                      "edits": expectation.edits, "skew_sensitive": expectation.skew_sensitive}
            if not want and value is True:
                kinds = ["lost_opt_outs"] + (["stale_opt_ins"] if by_us else [])
            elif want:
                kinds = ["missing_opt_ins"]
            else:
                kinds = ["other_wrong"]
            wrong.append((kinds, detail, raced))
        if not wrong:
            continue
        if expectation.unmeasured:
            # the vendor stamped it with a clock that was off while nothing could measure it
            # (e.g. the ledger locked the whole time): reported apart, not the product's doing
            verdict.unmeasured_skew += 1
            for _, detail, _ in wrong:
                verdict.note("unmeasured_skew", detail)
            continue
        if any(raced for _, _, raced in wrong) and not expectation.skew_sensitive:
            # a person's change overwritten by a write of ours already on its way: the rest of
            # the key's damage follows from that one (the change was never there to be read)
            verdict.overwritten_in_flight += 1
            for _, detail, _ in wrong:
                verdict.note("overwritten_in_flight", detail)
            continue
        for kinds, detail, _ in wrong:
            for kind in kinds:
                if key not in flagged[kind]:
                    flagged[kind].add(key)
                    setattr(verdict, kind, getattr(verdict, kind) + 1)
                verdict.note(kind, detail)
            if "lost_opt_outs" in kinds:
                causes[key].add("clock skew" if expectation.skew_sensitive else
                                "overwritten by prefsync" if detail["written_by_prefsync"]
                                else "never delivered")
    for found in causes.values():
        # one cause per key: skew explains the rest; an overwrite explains a missing delivery
        cause = next(c for c in ("clock skew", "overwritten by prefsync", "never delivered")
                     if c in found)
        verdict.lost_causes[cause] = verdict.lost_causes.get(cause, 0) + 1

    # writes per target against the bound
    for target, count in ours.items():
        verdict.max_writes_per_target = max(verdict.max_writes_per_target, count)
        target_side, who, preference = target
        email = who if target_side == "dotdigital" else str(last[target].get("email") or "").lower()
        edits = expected[(email, preference)].edits if (email, preference) in expected else 0
        if count > 2 * edits + write_slack:
            verdict.excess_writes += 1
            verdict.note("excess_writes", {"side": target_side, "target": who,
                                           "preference_id": preference, "writes": count,
                                           "edits": edits})

    poison = {e.message_id for e in history.of(Poison)}
    dead_ids = {str(d.get("message_id")) for d in observed.dead_letters}
    for dead in observed.dead_letters:
        if str(dead.get("message_id")) not in poison:
            verdict.unexpected_dead_letters += 1
            verdict.note("unexpected_dead_letters", dict(dead))
    verdict.poison_not_dead_lettered = len(poison - dead_ids)
    verdict.outstanding_keys = len(set(observed.outstanding))
    for key in sorted(set(observed.outstanding))[:MAX_DETAILS]:
        verdict.note("outstanding_keys", {"email": key[0], "preference_id": key[1]})
    return verdict


def _describe(event: Baseline | Edit) -> dict[str, Any]:
    if isinstance(event, Baseline):
        return {"kind": "baseline", "opted_in": event.opted_in}
    return {"kind": "edit", "side": event.side, "opted_in": event.opted_in,
            "at": event.at.isoformat(), "offset_s": event.offset_s, "record_id": event.record_id}
