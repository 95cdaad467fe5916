"""A small simulated world for the sync rules: two vendor sides holding one preference, users
changing it, pollers reading current states, the reconciler, and a writer that follows the
documented flow (read the target, check, begin, land, confirm), all interleaved at will.

Fidelity notes:
- Dataverse stamps whole seconds and a rising ``versionnumber``; the writer lands there only if
  the row's version is still the one it read (``If-Match``), else it abandons and retries.
- dotdigital stamps milliseconds and has no conditional write: a user change made between the
  writer's read and its landing is overwritten; if no poll saw it first it is lost at the vendor
  (``destroyed``) and cannot count in the expected answer.
- One writer per key at a time (commands are sharded per key), but its steps interleave with
  everything else; messages may be redelivered (duplicated) and taken in any order.
- Users never set a side, while our write to that side is open (from the writer's start to its
  confirmation, or to its in-flight limit when the writer stopped mid-write), to the value being
  written: such a change cannot be told from our echo (see ``find_echo``/``is_echo``); changes
  to the other value are fair game. An opt-out of ours read before its write is confirmed
  counts as a user change (``is_echo``), so it may join the expected answer (``adopted``).
- The same user never changes the same side twice within a second (each side's own history
  must be ordered at the precision the comparison uses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from common.domain import (
    SIDES,
    KeyState,
    Observation,
    Side,
    WriteCommand,
    abandon_write,
    begin_write,
    lww_rank,
    reconcile,
    record_write,
    settle,
    whole_second,
    writer_should_apply,
)
from tests.unit.domain.builders import KEY, T0


@dataclass
class Row:
    opted_in: bool | None = None
    time: datetime | None = None
    version: int | None = None
    user_change: int | None = None   # index of the user change it shows, None if ours


@dataclass
class Flight:
    command: WriteCommand
    read_version: int | None
    window_start: datetime
    landed_at: datetime | None = None
    produced_version: int | None = None


@dataclass(frozen=True)
class UserChange:
    side: Side
    opted_in: bool
    stamp: datetime


class WorldError(AssertionError):
    pass


@dataclass
class World:
    now: datetime = T0
    versions: int = 0
    rows: dict[Side, Row] = field(default_factory=lambda: {s: Row() for s in SIDES})
    state: KeyState | None = None
    inbox: list[Observation] = field(default_factory=list)
    outbox: list[WriteCommand] = field(default_factory=list)
    flight: Flight | None = None
    users: list[UserChange] = field(default_factory=list)
    observed: set[int] = field(default_factory=set)
    destroyed: set[int] = field(default_factory=set)
    ours: set[str] = field(default_factory=set)        # change ids of our own landings
    landings: dict[str, UserChange] = field(default_factory=dict)
    adopted: set[str] = field(default_factory=set)     # opt-out landings taken as user changes
    last_user_at: dict[Side, datetime] = field(default_factory=dict)
    vendor_writes: int = 0
    register_seconds: list[datetime] = field(default_factory=list)

    # -- clocks ---------------------------------------------------------------------------
    def tick(self, ms: int = 1) -> None:
        self.now += timedelta(milliseconds=max(1, ms))

    def _stamp(self, side: Side) -> tuple[datetime, int | None]:
        if side == "dynamics":
            self.versions += 1
            return whole_second(self.now), self.versions
        return self.now, None

    @staticmethod
    def _change_id(side: Side, time: datetime, version: int | None) -> str:
        return f"{side}:{version if version is not None else time.isoformat()}"

    # -- actors ---------------------------------------------------------------------------
    def user(self, side: Side, opted_in: bool, gap_ms: int) -> None:
        if self.state is not None and any(
                r.in_flight and r.opted_in == opted_in for r in self.state.writes.get(side)):
            return                                   # indistinguishable from our echo
        f = self.flight
        if f is not None and f.command.side == side and f.command.opted_in == opted_in:
            return                                   # likewise until its write is confirmed
        self.tick(gap_ms)
        last = self.last_user_at.get(side)
        if last is not None and self.now < last + timedelta(seconds=1):
            self.now = last + timedelta(seconds=1)
        self.last_user_at[side] = self.now
        time, version = self._stamp(side)
        self.users.append(UserChange(side=side, opted_in=opted_in, stamp=time))
        self.rows[side] = Row(opted_in=opted_in, time=time, version=version,
                              user_change=len(self.users) - 1)

    def read(self, side: Side) -> Observation | None:
        row = self.rows[side]
        if row.opted_in is None or row.time is None:
            return None                              # never set: not an observation
        if row.user_change is not None:
            self.observed.add(row.user_change)
        return Observation(key=KEY, side=side, opted_in=row.opted_in, origin_time=row.time,
                           version=row.version,
                           change_id=self._change_id(side, row.time, row.version))

    def poll(self, side: Side) -> None:
        o = self.read(side)
        if o is not None:
            self.inbox.append(o)

    def _reconcile(self, o: Observation) -> None:
        d = reconcile(self.state, o)
        self.state = d.state
        self._check_register()
        self.outbox.extend(d.commands)

    def _check_register(self) -> None:
        assert self.state is not None
        register = self.state.register
        if register is None:
            return
        if register.change_id in self.ours:
            if register.opted_in:
                raise WorldError(f"our own opt-in became the register: {register}")
            # an opt-out read while its write was unconfirmed counts as a user change
            self.adopted.add(register.change_id)
        second = whole_second(register.origin_time)
        if self.register_seconds and second < self.register_seconds[-1]:
            raise WorldError("register time went backwards")
        self.register_seconds.append(second)

    def reconcile_one(self, index: int, redeliver: bool) -> None:
        if not self.inbox:
            return
        o = self.inbox[index % len(self.inbox)]
        if not redeliver:
            self.inbox.remove(o)
        self._reconcile(o)

    def start_write(self, index: int, redeliver: bool, took_ms: int = 300) -> None:
        if self.flight is not None or not self.outbox:
            return
        command = self.outbox[index % len(self.outbox)]
        if not redeliver:
            self.outbox.remove(command)
        self.tick(took_ms)
        current = self.read(command.side)             # read the target first
        if current is not None:
            self._reconcile(current)
        assert self.state is not None
        if not writer_should_apply(self.state, command):
            return
        register = self.state.register
        if register is None or (register.opted_in, register.origin_time) != (
                command.opted_in, command.origin_time):
            raise WorldError(f"the writer acted on a superseded command: {command}")
        self.tick(100)
        self.state = begin_write(self.state, command, window_start=self.now)
        self.flight = Flight(command=command, read_version=self.rows[command.side].version,
                             window_start=self.now)

    def land(self, confirm: bool, took_ms: int = 400) -> None:
        f = self.flight
        if f is None or f.landed_at is not None:
            return
        assert self.state is not None
        side = f.command.side
        row = self.rows[side]
        self.tick(took_ms)
        if side == "dynamics" and row.version != f.read_version:
            # If-Match refused: the row changed since the read; retry the command later
            self.state = abandon_write(self.state, f.command)
            self.flight = None
            self.outbox.append(f.command)
            return
        if row.user_change is not None and row.user_change not in self.observed:
            if side == "dynamics":
                raise WorldError("a Dataverse write overwrote an unseen change despite If-Match")
            self.destroyed.add(row.user_change)
        time, version = self._stamp(side)
        self.rows[side] = Row(opted_in=f.command.opted_in, time=time, version=version)
        change_id = self._change_id(side, time, version)
        self.ours.add(change_id)
        self.landings[change_id] = UserChange(side=side, opted_in=f.command.opted_in, stamp=time)
        self.vendor_writes += 1
        f.landed_at, f.produced_version = self.now, version
        if confirm:
            self.confirm()

    def crash(self) -> None:
        """The writer stops mid-write (before or after landing, never confirmed); the broker
        redelivers the command to the next writer."""
        f = self.flight
        if f is None:
            return
        self.flight = None
        self.outbox.append(f.command)

    def fail(self) -> None:
        """The vendor refused the write (nothing landed): abandon it, retry the command later."""
        f = self.flight
        if f is None or f.landed_at is not None:
            return
        assert self.state is not None
        self.state = abandon_write(self.state, f.command)
        self.flight = None
        self.outbox.append(f.command)

    def confirm(self) -> None:
        f = self.flight
        if f is None or f.landed_at is None:
            return
        assert self.state is not None
        self.tick(100)
        # the response (and the vendor time it reports) comes after the landing
        self.state = record_write(self.state, f.command, produced_version=f.produced_version,
                                  window_start=f.window_start, window_end=self.now,
                                  written_at=self.now)
        self.state, commands = settle(self.state)
        self.outbox.extend(commands)
        self.flight = None

    # -- the end ----------------------------------------------------------------------------
    def quiesce(self, *, rounds: int = 40) -> None:
        for _ in range(rounds):
            before = self.vendor_writes
            self.land(confirm=True)
            self.confirm()
            self.tick(1500)
            for side in SIDES:
                self.poll(side)
            while self.inbox:
                self.reconcile_one(0, False)
            while self.outbox:
                self.start_write(0, False)
                self.land(confirm=True)
            if self.vendor_writes == before and not self.inbox and not self.outbox:
                return
        raise WorldError("did not quiesce")

    def expected(self) -> UserChange | None:
        # What the pollers never saw cannot count: a change overwritten before any poll, by the
        # same person later (who then outranks it) or by our write racing it (``destroyed``).
        effective = [u for i, u in enumerate(self.users) if i in self.observed]
        effective += [self.landings[c] for c in self.adopted]
        if not effective:
            return None
        return max(effective, key=lambda u: lww_rank(origin_time=u.stamp, opted_in=u.opted_in))

    def check_converged(self) -> None:
        winner = self.expected()
        if winner is None:
            return
        assert self.state is not None and self.state.register is not None
        register = self.state.register
        got = (register.opted_in, whole_second(register.origin_time))
        want = (winner.opted_in, whole_second(winner.stamp))
        if got != want:
            raise WorldError(f"register {got} != last writer {want}")
        for side in SIDES:
            if self.rows[side].opted_in != winner.opted_in:
                raise WorldError(f"{side} holds {self.rows[side].opted_in}, "
                                 f"expected {winner.opted_in}")
