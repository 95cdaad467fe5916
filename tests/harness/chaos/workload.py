"""The chaos workload: people editing both sides while syncs run, recorded as a history.

Seeded, so a run's sequence of operations is reproducible (what the services make of it under
faults is not). Weighted towards opt-outs and conflicts:

- single edits on either side, most of them flipping what the person holds now (an opt-in to
  an opt-out more often than the reverse), some re-saving the same value;
- conflicts: both sides edited at once with opposite values (usually inside one second: a tie
  that the opt-out must win), or one after the other a second apart;
- suppression: a dotdigital contact unsubscribes, edits go on, it is subscribed again a few
  seconds later (always before the workload ends);
- email changes: a record moves to the email of another person (a record joining an email);
- list joins: records created outside every email-activated list (with rows of their own, set
  before the run) join one during the run; one of them never does;
- poison: a malformed message and one with an impossible email, published among the real ones.

Edits go through the simulators' ``/_sim/`` routes (as a user in each vendor's UI would, and
untouched by injected API faults); each is recorded with the vendor's own stamp of the change
from the answer. The same row is never edited twice within a second (a row's sequence inside
one second could not be ordered from the stamps). Records and list memberships go through the
Dataverse API, only while no fault is injected into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika

from common.domain import Side
from common.messaging.amqp import AmqpPublisher, Outgoing
from common.messaging.envelope import Envelope, PreferenceChange, encode
from common.messaging.topology import CHANGES_EXCHANGE, Topology
from common.vendors.dataverse.schema import OPTED_IN, OPTED_OUT, SUBSCRIPTIONS
from services.cli.sync_now import request_sync
from services.simulators import seeding
from tests.harness.chaos.history import (
    BASELINE_AT,
    Baseline,
    Create,
    Edit,
    History,
    Join,
    Key,
    Move,
    Poison,
    Resubscribe,
    Suppress,
    parse_time,
)
from tests.harness.chaos.world import ChaosWorld

# The same (side, email, preference) is not edited again sooner than this (seconds).
ROW_SPACING_S = 1.3
LEAD_LIST_CODE = 4


@dataclass(frozen=True, kw_only=True)
class WorkloadSpec:
    seconds: float = 20.0
    ops_per_s: float = 3.0
    sync_every_s: float = 3.0
    joiners: int = 3
    moves: int = 1
    # False: moves only between emails whose baseline values agree on every preference
    moves_any_values: bool = True
    suppressions: int = 2
    poison: bool = True


@dataclass
class Workload:
    world: ChaosWorld
    spec: WorkloadSpec
    rng: random.Random
    history: History = field(default_factory=History)
    people: list[str] = field(default_factory=list)
    preferences: list[int] = field(default_factory=list)
    # emails edits may go to (a moved-away email has no Dynamics record left)
    editable: list[str] = field(default_factory=list)
    model: dict[Key, tuple[datetime, bool]] = field(default_factory=dict)
    baseline_values: dict[Key, bool] = field(default_factory=dict)
    last_edit: dict[tuple[Side, str, int], float] = field(default_factory=dict)
    joiners: dict[str, str] = field(default_factory=dict)     # record id -> email
    to_join: list[str] = field(default_factory=list)
    suppressed: dict[str, float] = field(default_factory=dict)  # email -> resubscribe at
    suppressions_left: int = 0
    moves_left: int = 0
    touched: set[str] = field(default_factory=set)
    poisoned: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, world: ChaosWorld, spec: WorkloadSpec, *, seed: int) -> Workload:
        people = [p.email for p in seeding.people(world.spec.records, world.spec.seed)]
        preferences = [p.id for p in seeding.leaf_preferences(world.spec.preferences,
                                                              world.spec.seed)]
        return cls(world=world, spec=spec, rng=random.Random(f"workload:{seed}"), people=people,
                   preferences=preferences, editable=list(people),
                   suppressions_left=spec.suppressions, moves_left=spec.moves)

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    # --- before the first sync -----------------------------------------------------------------
    async def create_joiners(self) -> None:
        """Leads with the emails of existing people, outside every email-activated list, each
        with rows of its own (which take part only once the lead joins a list)."""
        emails = self.rng.sample(self.people[len(self.people) // 2:], self.spec.joiners)
        async with self.world.dataverse() as client:
            for email in emails:
                created = await client.create("leads", {
                    "emailaddress1": email, "firstname": "Late", "lastname": "Joiner"},
                    return_representation=True)
                assert created.body is not None
                record_id = str(created.body["leadid"])
                self.history.add(Create(record_id=record_id, record_type="lead", email=email))
                self.joiners[record_id] = email
                for preference in self.rng.sample(self.preferences, 2):
                    opted_in = self.rng.random() < 0.4
                    row = await client.create(SUBSCRIPTIONS, {
                        "psync_status": OPTED_IN if opted_in else OPTED_OUT,
                        "psync_preferenceid@odata.bind":
                            f"/psync_marketingpreferences({await self._catalog_row(client, preference)})",
                        "psync_leadid@odata.bind": f"/leads({record_id})"},
                        return_representation=True)
                    assert row.body is not None
                    self._record(Edit(side="dynamics", email=email, preference_id=preference,
                                      opted_in=opted_in, at=parse_time(str(row.body["modifiedon"])),
                                      record_id=record_id,
                                      version=int(row.body["versionnumber"])))
        # all but one join during the run; the last never does
        self.to_join = list(self.joiners)[:-1] if len(self.joiners) > 1 else list(self.joiners)

    async def _catalog_row(self, client: Any, preference: int) -> str:
        async for page in client.iter_pages(
                "psync_marketingpreferences", select=["psync_marketingpreferenceid"],
                filter=f"psync_ecaccount eq '{self.world.account}' and "
                       f"psync_ecpreferenceid eq {preference}"):
            for row in page.rows:
                return str(row["psync_marketingpreferenceid"])
        raise AssertionError(f"no catalog row for {preference}")

    def baseline(self, values: dict[Key, bool]) -> None:
        self.baseline_values = dict(values)
        for (email, preference), value in sorted(values.items()):
            self.history.add(Baseline(email=email, preference_id=preference, opted_in=value))
            self.model.setdefault((email, preference), (BASELINE_AT, value))
        self.editable = [e for e in self.editable
                         if all((e, p) in values for p in self.preferences)]

    # --- recording -----------------------------------------------------------------------------
    def _record(self, edit: Edit) -> None:
        self.history.add(edit)
        self.count(f"edit-{edit.side}-{'in' if edit.opted_in else 'out'}")
        key = edit.key
        second = edit.true_at.replace(microsecond=0)
        known = self.model.get(key)
        if known is None or second > known[0] or (second == known[0] and not edit.opted_in):
            self.model[key] = (second, edit.opted_in)

    def _free(self, side: Side, email: str, preference: int) -> bool:
        last = self.last_edit.get((side, email, preference))
        return last is None or time.monotonic() - last >= ROW_SPACING_S

    async def edit(self, side: Side, email: str, preference: int, opted_in: bool) -> None:
        self.last_edit[(side, email, preference)] = time.monotonic()
        self.touched.add(email)
        async with self.world.clock_of(side):
            edit = await self._edit(side, email, preference, opted_in)
        self._record(edit)

    async def _edit(self, side: Side, email: str, preference: int, opted_in: bool) -> Edit:
        world = self.world
        offset = world.offsets[side]
        if side == "dynamics":
            answer = await world.edit_dynamics(email, preference, opted_in)
            return Edit(side="dynamics", email=email, preference_id=preference,
                        opted_in=opted_in, at=parse_time(answer["modifiedon"]), offset_s=offset,
                        record_id=str(answer["record_id"]), version=int(answer["versionnumber"]))
        answer = await world.edit_dotdigital(email, preference, opted_in)
        stamp = next(o["dateModifed"] for o in answer["marketingPreferenceOptIns"]
                     if int(o["marketingPreferenceId"]) == preference)
        return Edit(side="dotdigital", email=email, preference_id=preference, opted_in=opted_in,
                    at=parse_time(stamp), offset_s=offset)

    # --- operations ----------------------------------------------------------------------------
    def _pick(self, sides: tuple[Side, ...]) -> tuple[str, int] | None:
        for _ in range(20):
            email = self.rng.choice(self.editable)
            preference = self.rng.choice(self.preferences)
            if all(self._free(side, email, preference) for side in sides):
                return email, preference
        return None

    def _value(self, key: Key) -> bool:
        """What a person changes to: mostly the opposite of what they hold, opt-outs first."""
        held = self.model[key][1]
        if held:
            return self.rng.random() < 0.15  # mostly to opt-out
        return self.rng.random() < 0.6       # back to opt-in, or the opt-out saved again

    async def single(self) -> None:
        side: Side = self.rng.choice(("dynamics", "dotdigital"))
        picked = self._pick((side,))
        if picked is not None:
            await self.edit(side, *picked, self._value(picked))
            self.count("single")

    async def conflict(self, *, same_second: bool) -> None:
        picked = self._pick(("dynamics", "dotdigital"))
        if picked is None:
            return
        out_side: Side = self.rng.choice(("dynamics", "dotdigital"))
        in_side: Side = "dotdigital" if out_side == "dynamics" else "dynamics"
        if same_second:
            await asyncio.gather(self.edit(out_side, *picked, False),
                                 self.edit(in_side, *picked, True))
            self.count("conflict-same-second")
        else:
            first, second = ((out_side, False), (in_side, True))
            if self.rng.random() < 0.5:
                first, second = second, first
            await self.edit(first[0], *picked, first[1])
            # the vendors stamp edits to the second: the clock must move past it for the
            # second edit to be later (not a wait for anything)
            await asyncio.sleep(1.05)
            await self.edit(second[0], *picked, second[1])
            self.count("conflict-in-turn")

    async def suppress(self) -> None:
        candidates = [e for e in self.editable if e not in self.suppressed]
        if not candidates or self.suppressions_left <= 0:
            return
        email = self.rng.choice(candidates)
        await self.world.set_status(email, "Unsubscribed")
        self.history.add(Suppress(email=email, at=datetime.now(UTC)))
        self.suppressed[email] = time.monotonic() + self.rng.uniform(3.0, 8.0)
        self.suppressions_left -= 1
        self.count("suppress")

    async def resubscribe(self, *, all_of_them: bool = False) -> None:
        now = time.monotonic()
        for email, due in list(self.suppressed.items()):
            if all_of_them or due <= now:
                await self.world.set_status(email, "Subscribed")
                self.history.add(Resubscribe(email=email, at=datetime.now(UTC)))
                del self.suppressed[email]
                self.count("resubscribe")

    async def move(self) -> None:
        """A record changes its email to another person's: it joins that email.

        The record is one no edit of the run touched yet (its rows were all read under the old
        email). By the sync rules the new email keeps its own preferences (``fresh``) and the
        record receives them: its old rows, however recent, never compete for the new email.
        Unless ``moves_any_values``, the two emails agree on every preference."""
        if self.moves_left <= 0:
            return
        joined = set(self.joiners.values())
        sources = [e for e in self.editable if e not in self.touched and e not in joined
                   and e not in self.suppressed]
        targets = [e for e in self.editable if e not in self.suppressed]
        pairs = [(old, new) for old in sources for new in targets if old != new and (
            self.spec.moves_any_values or all(
                self.baseline_values.get((old, p)) == self.baseline_values.get((new, p))
                for p in self.preferences))]
        if not pairs:
            return
        old, new = self.rng.choice(pairs)
        answer = await self.world.call("POST", f"{self.world.dyn_url}/_sim/dynamics/edit",
                                       {"email": old, "set": {"emailaddress1": new}})
        self.history.add(Move(record_id=str(answer["id"]), old_email=old, new_email=new,
                              at=datetime.now(UTC)))
        self.editable.remove(old)
        self.moves_left -= 1
        self.count("move")

    async def join(self) -> None:
        """A lead created outside the lists joins the email-activated list of leads."""
        if not self.to_join or "dynamics" in self.world.faulty:
            return
        record_id = self.to_join[0]
        try:
            async with self.world.dataverse() as client:
                list_id = await self._lead_list(client)
                await client.create(f"lists({list_id})/Microsoft.Dynamics.CRM.AddMemberList",
                                    {"EntityId": record_id})
        except Exception as exc:  # a fault began meanwhile: try again later
            self.errors.append(f"join: {type(exc).__name__}: {exc}"[:200])
            return
        self.to_join.pop(0)
        self.history.add(Join(record_id=record_id, at=datetime.now(UTC)))
        self.count("join")

    async def _lead_list(self, client: Any) -> str:
        async for page in client.iter_pages(
                "lists", select=["listid"],
                filter=f"createdfromcode eq {LEAD_LIST_CODE} and psync_emailactivated eq true"):
            for row in page.rows:
                return str(row["listid"])
        raise AssertionError("no email-activated list of leads")

    async def poison(self) -> None:
        """A malformed message, and a well-formed one whose email cannot be a key."""
        if self.poisoned:
            return
        account = self.world.account
        bad = Envelope(type="preference-changes", account=account, source="dotdigital",
                       change_id=f"poison-email-{account}", origin_time=datetime.now(UTC),
                       changes=(PreferenceChange(
                           email="a@b@c.com", preference_id=self.preferences[0],
                           opted_in=False, origin_time=datetime.now(UTC) - timedelta(seconds=1),
                           change_id="poison"),))
        items = [
            Outgoing(exchange=CHANGES_EXCHANGE, routing_key=Topology.changes_key(account, 0),
                     body=b"{not json", message_id=f"poison-malformed-{account}"),
            Outgoing(exchange=CHANGES_EXCHANGE, routing_key=Topology.changes_key(account, 1),
                     body=encode(bad), message_id=bad.change_id),
        ]
        try:
            connection = await aio_pika.connect_robust(self.world.broker.url)
            async with connection:
                publisher = await AmqpPublisher.open(connection)
                await publisher.publish_many(items)
        except Exception as exc:  # the broker may be down: try again later
            self.errors.append(f"poison: {type(exc).__name__}: {exc}"[:200])
            return
        for item, reason in zip(items, ("malformed", "impossible email"), strict=True):
            self.history.add(Poison(message_id=item.message_id, reason=reason))
        self.poisoned = True
        self.count("poison")

    # --- the run -------------------------------------------------------------------------------
    async def _syncs(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await request_sync(config=self.world.config, account=self.world.account)
                self.count("sync-requested")
            except Exception:  # the broker may be down
                self.count("sync-request-failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.spec.sync_every_s)

    async def run(self, *, until: asyncio.Event | None = None) -> None:
        """Edit both sides for ``spec.seconds``, and on until ``until`` is set (the faults
        healed), while syncs are requested every few seconds."""
        stop = asyncio.Event()
        syncs = asyncio.create_task(self._syncs(stop))
        operations = [
            (self.single, 45.0),
            (lambda: self.conflict(same_second=True), 25.0),
            (lambda: self.conflict(same_second=False), 10.0),
            (self.suppress, 6.0),
            (self.move, 4.0),
            (self.join, 6.0),
        ]
        weights = [w for _, w in operations]
        started = time.monotonic()
        poison_at = started + self.spec.seconds * self.rng.uniform(0.2, 0.5)
        try:
            while (time.monotonic() - started < self.spec.seconds
                   or (until is not None and not until.is_set())):
                operation = self.rng.choices([op for op, _ in operations], weights)[0]
                try:
                    await operation()
                    await self.resubscribe()
                    if self.spec.poison and time.monotonic() >= poison_at:
                        await self.poison()
                except Exception as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                # deliberate pacing: operations arrive at ``ops_per_s`` (not a wait)
                await asyncio.sleep(self.rng.expovariate(self.spec.ops_per_s))
        finally:
            stop.set()
            await syncs

    async def finish(self, *, timeout_s: float = 120.0) -> None:
        """After the faults healed: every contact subscribed again, every joiner but one in its
        list, the poison sent."""
        await self.resubscribe(all_of_them=True)
        deadline = time.monotonic() + timeout_s
        while (self.to_join or (self.spec.poison and not self.poisoned)) \
                and time.monotonic() < deadline:
            await self.join()
            if self.spec.poison:
                await self.poison()
            if self.to_join or (self.spec.poison and not self.poisoned):
                # retried a second later while a fault refuses them; not through
                # tests.harness.waiting, whose timeout would cancel a vendor call under way and
                # leave the history unsure whether the join happened
                await asyncio.sleep(1.0)

    def summary(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "edits": len(self.history.edits),
                "errors": self.errors[:10], "error_count": len(self.errors)}

