"""The ec-poller over the in-memory broker, against the dotdigital simulator over a real socket:
what a run costs in dotdigital calls (``/_sim/stats``), and that a change or a suppression
landing while a run reads is read by the next one, with no overlap to catch it. What a read
keeps of its change ids for the next read's overlap is bounded."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.config import AccountConfig, parse_config
from common.domain import ContactState, normalize_email
from common.messaging.abc import Outgoing
from common.messaging.envelope import Change, ContactStatusChange, PreferenceChange, decode
from common.messaging.topology import CHANGES_EXCHANGE, Topology
from common.runs import RunRequest
from common.store.checkpoints import PREFERENCE_TREE, PREFERENCE_TREE_RUN
from common.vendors.dotdigital.client import DotdigitalClient
from common.vendors.dotdigital.feed import FeedPosition, feed_position
from common.vendors.dotdigital.models import Contact, ContactOptIns, PreferenceOptIn
from common.vendors.dotdigital.modified import ModifiedPosition
from services.ec_poller import service as ec_poller
from services.ec_poller.service import (
    ContactsRead,
    EcPoller,
    Seen,
    SeenBefore,
    contacts_read,
    leaf_preference_ids,
    opt_in_change_id,
    preference_changes,
)
from services.simulators import seeding
from tests.unit.domain.builders import T0, examples
from tests.unit.services.support import ACCOUNT, SHARDS, Bed, bed
from tests.unit.vendors.support import DD_ACCOUNT, SimControl, dotdigital_config, dotdigital_sim

pytestmark = pytest.mark.anyio

SEED = 5
RECORDS = 12
OPT_INS = "GET /v2/contacts/with-preference/{preference_id}/opt-ins-since/{date}"
SUPPRESSED = "GET /v2/contacts/suppressed-since/{date}"
CONTACTS_V3 = "GET /contacts/v3"
TREE = "GET /v2/preferences"
SUBSCRIPTIONS = "GET /v2/contacts/{email}/subscriptions"


def account_config(url: str, *, overlap_s: float, max_concurrency: int) -> AccountConfig:
    config = parse_config({
        "broker": {"url": "amqp://127.0.0.1:1/"},
        "store": {"url": "sqlite:///unused.db"},
        "accounts": [{
            "id": ACCOUNT,
            "dynamics": {"url": "http://127.0.0.1:1", "token_url": "http://127.0.0.1:1/t",
                         "client_id": "c", "client_secret_env": "S"},
            "dotdigital": {"url": url, "api_user": "u", "password_env": "S",
                           "feed_overlap_s": overlap_s, "max_concurrency": max_concurrency},
        }]}, env={"S": "x"})
    return config.accounts[0]


@dataclass
class Hooked:
    """The broker, and a step run once before the first publish of changes (a user acting
    while the poller reads)."""

    bed: Bed
    before_changes: Callable[[], Awaitable[None]] | None = None
    # the changes published, in the order they were
    changes: list[Change] = field(default_factory=list)

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        step, self.before_changes = self.before_changes, None
        if step is not None and any(i.exchange == CHANGES_EXCHANGE for i in items):
            await step()
        await self.bed.broker.publish_many(items)
        self.changes.extend(change for i in items if i.exchange == CHANGES_EXCHANGE
                            for change in decode(i.body).changes)


@dataclass
class Scene:
    bed: Bed
    sim: SimControl
    client: DotdigitalClient
    poller: EcPoller
    publisher: Hooked
    preferences: list[int] = field(default_factory=list)
    runs: int = 0
    # how far ahead of ours the clock is that the poller chooses where a feed read starts by
    ahead: list[float] = field(default_factory=lambda: [0.0])
    # the simulator's clock, and ours, right before the ec-poller's last run began
    began_sim: datetime | None = None
    began: float = 0.0

    @property
    def emails(self) -> list[str]:
        return [p.email for p in seeding.people(RECORDS, SEED)]

    async def calls(self) -> dict[str, int]:
        return dict((await self.sim.stats())["calls"])

    async def dynamics_part(self, run_id: str) -> None:
        """What the dynamics-poller does at the start of a run, before it starts the
        ec-poller's part: it reads dotdigital's preference tree and keeps it with its run."""
        await PREFERENCE_TREE.set(self.bed.store, ACCOUNT, await self.client.preferences())
        await PREFERENCE_TREE_RUN.set(self.bed.store, ACCOUNT, run_id)

    async def run(self, *, emails: Sequence[str] = (), tree_read: bool = True
                  ) -> tuple[dict[str, int], list[Change]]:
        """One run (the dynamics-poller's tree read first, unless ``tree_read`` is off): the
        dotdigital calls it made, by route, and the changes it published."""
        self.runs += 1
        run_id = f"run-{self.runs}"
        before = await self.calls()
        if tree_read:
            await self.dynamics_part(run_id)
        self.began_sim, self.began = await self.sim_now(), time.monotonic()
        await self.poller.run_cycle(RunRequest(run_id=run_id, covers=(run_id,),
                                               eligible_emails=tuple(emails)))
        after = await self.calls()
        made = {route: n - before.get(route, 0) for route, n in after.items()
                if n != before.get(route, 0)}
        published = [change for shard in range(SHARDS)
                     for message in self.bed.broker.take(Topology.changes_queue(ACCOUNT, shard))
                     for change in decode(message.body).changes]
        return made, published

    async def edit(self, email: str, *, preferences: dict[int, bool] | None = None,
                   status: str | None = None, stamped_ago_s: float = 0.0) -> None:
        body: dict[str, Any] = {"account": DD_ACCOUNT, "email": email,
                                "stamped_ago_s": stamped_ago_s}
        if preferences:
            body["preferences"] = {str(k): v for k, v in preferences.items()}
        if status:
            body["status"] = status
        await self.sim.call("POST", "dotdigital/edit", body)

    async def sim_now(self) -> datetime:
        return datetime.fromisoformat((await self.sim.call("GET", "clock"))["now"])


@asynccontextmanager
async def scene(tmp_path: Path, *, overlap_s: float = 300.0, preference_count: int = 3,
                states: str = "sample", max_concurrency: int = 4) -> AsyncIterator[Scene]:
    async with bed(tmp_path) as found, dotdigital_sim() as sim, DotdigitalClient(
            config=dotdigital_config(sim.url)) as client:
        await sim.seed(records=RECORDS, preferences=preference_count, seed=SEED, account=DD_ACCOUNT,
                       states=states)
        publisher = Hooked(bed=found)
        config = account_config(sim.url, overlap_s=overlap_s, max_concurrency=max_concurrency)
        ahead = [0.0]
        poller = EcPoller(account=config, client=client,
                          store=found.store, publisher=publisher, shards=SHARDS,
                          now=lambda: time.time() + ahead[0])
        preferences = leaf_preference_ids(await client.preferences())
        yield Scene(bed=found, sim=sim, client=client, poller=poller, publisher=publisher,
                    preferences=preferences, ahead=ahead)


async def test_an_idle_run_costs_one_call_per_feed(tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        assert len(s.preferences) == 3
        await s.run()  # the first run reads every feed from the beginning
        made, published = await s.run()
        # the tree (the dynamics-poller's read), each preference's opt-ins, the suppressions
        # (unsubscribes among them) and the contacts modified since: nothing else
        assert made == {TREE: 1, OPT_INS: 3, SUPPRESSED: 1, CONTACTS_V3: 1}, made
        assert published == []


async def test_the_tree_is_read_again_only_when_not_read_for_this_run(tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        await s.run()
        made, _ = await s.run(tree_read=False)  # the stored tree is an earlier run's
        assert made == {TREE: 1, OPT_INS: 3, SUPPRESSED: 1, CONTACTS_V3: 1}, made
        assert await PREFERENCE_TREE_RUN.get(s.bed.store, ACCOUNT) == f"run-{s.runs}"


async def test_a_preference_deleted_after_the_tree_was_read_is_skipped(tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        await s.run()
        await s.dynamics_part("run-2")
        await s.client.delete_preference(s.preferences[-1])
        before = await s.calls()
        await s.poller.run_cycle(RunRequest(run_id="run-2", covers=("run-2",)))
        after = await s.calls()
        assert after[OPT_INS] - before[OPT_INS] == 3  # the last one answered 404
        assert after[SUPPRESSED] - before[SUPPRESSED] == 1


async def test_newly_eligible_emails_cost_one_call_each(tmp_path: Path) -> None:
    async with scene(tmp_path) as s:
        await s.run()
        emails = [*s.emails[:2], "not.in.dotdigital@example.com"]
        made, published = await s.run(emails=emails)
        assert made == {TREE: 1, OPT_INS: 3, SUPPRESSED: 1, CONTACTS_V3: 1,
                        SUBSCRIPTIONS: 3}, made
        assert {c.email for c in published if isinstance(c, ContactStatusChange)} == \
            set(emails[:2])


async def test_changes_landing_while_a_run_reads_are_read_by_the_next_run(
        tmp_path: Path) -> None:
    """No overlap: the watermark alone has to keep them. The run's first answer is slow
    (its ``Date`` header is over a second later than the run's start), and a preference
    change and an unsubscribe commit stamped between the run's start and that answer,
    visible only after the run: the next run reads both. (The feeds are read one at a time,
    so one is left to read while the first publishes.)"""
    async with scene(tmp_path, overlap_s=0.0, max_concurrency=1) as s:
        await s.run()
        first, last = s.preferences[0], s.preferences[-1]
        changed, unsubscribed, during = s.emails[0], s.emails[1], s.emails[2]
        values = {email: (await s.client.subscriptions(email)).opt_ins for email in s.emails}
        flipped = not next((o.is_opted_in for o in values[changed]
                            if o.preference_id == first), False)
        # a change made while the run reads, to a feed it has not read yet: read in this run
        # (and not published again by the next)
        async def meanwhile() -> None:
            await s.edit(during, preferences={last: True})

        s.publisher.before_changes = meanwhile
        await s.edit(s.emails[3], preferences={first: True})  # so the run publishes
        await s.sim.faults(latency_ms={f"GET /v2/contacts/with-preference/{first}/": 1100})
        made, published = await s.run()
        await s.sim.faults()
        assert made[OPT_INS] == 3 and "GET /v2/server-time" not in made, made
        assert any(isinstance(c, PreferenceChange) and c.email == during
                   for c in published), published
        # stamped 0.05 s after the run began (before its first answer's Date), visible now
        ago = time.monotonic() - s.began - 0.05
        await s.edit(changed, preferences={first: flipped}, stamped_ago_s=ago)
        await s.edit(unsubscribed, status="Unsubscribed", stamped_ago_s=ago)
        _, published = await s.run()
        changes = {(c.email, c.preference_id, c.opted_in) for c in published
                   if isinstance(c, PreferenceChange)}
        statuses = {(c.email, c.status) for c in published if isinstance(c, ContactStatusChange)}
        # only what landed: what the previous run published is not published again
        assert changes == {(changed, first, flipped)}, published
        assert (unsubscribed, "Unsubscribed") in statuses, published


async def test_a_resubscription_listed_late_waits_for_the_next_read_of_the_overlap(
        tmp_path: Path) -> None:
    """Runs a few seconds apart read the contacts modified since the previous run began; a
    run twice the overlap past what was surely read reads the overlap again
    (:mod:`common.vendors.dotdigital.modified`). A resubscription stamped before the previous
    run began, listed only after it (a write dotdigital was still committing), is read by
    that run: the contact stays suppressed, left alone, until then."""
    async with scene(tmp_path, overlap_s=30.0) as s:
        email = s.emails[0]
        await s.edit(email, status="Unsubscribed", stamped_ago_s=3600)
        await s.bed.store.save_contacts([ContactState(
            account=ACCOUNT, email=email, status="Unsubscribed",
            since=await s.sim_now() - timedelta(hours=1))])
        await s.run()  # the first: the feeds from the beginning carried every status
        await s.run()
        # resubscribed 5 s before the last run began (after its first run's overlap), listed now
        await s.edit(email, status="Subscribed", stamped_ago_s=time.monotonic() - s.began + 5)
        made, published = await s.run()
        assert made[CONTACTS_V3] == 1 and not resumed(published, email), published
        before = await ModifiedPosition.load(s.bed.store, ACCOUNT)
        # dotdigital's clock moves on past twice the overlap from what was surely read
        await s.sim.clock(offset_s=40.0)
        _, published = await s.run()
        assert resumed(published, email) == ["subscribed"], published
        after = await ModifiedPosition.load(s.bed.store, ACCOUNT)
        assert before is not None and after is not None
        assert before.covered is not None and after.covered is not None
        assert after.covered > before.covered  # that read was full
        # and the next run reads from where that one began again: nothing to publish
        _, published = await s.run()
        assert resumed(published, email) == [], published


async def test_an_opt_in_listed_late_waits_for_the_next_read_of_the_overlap(
        tmp_path: Path) -> None:
    """Runs a few seconds apart read each feed from where the previous read began; a run twice
    the overlap past what was surely read reads the overlap again
    (:mod:`common.vendors.dotdigital.overlap`). An opt-in stamped before the previous run
    began, listed only after it (a write dotdigital was still committing), is read by that
    run, and only it: what the runs between published is not published again."""
    async with scene(tmp_path, overlap_s=30.0, preference_count=1) as s:
        (preference,) = s.preferences
        checkpoint = feed_position(preference)
        late, early = s.emails[0], s.emails[1]
        values = {o.preference_id: o.is_opted_in
                  for o in (await s.client.subscriptions(late)).opt_ins}
        flipped = not values.get(preference, False)
        await s.run()  # the first: from the beginning
        first = await checkpoint.get(s.bed.store, ACCOUNT)
        await s.edit(early, preferences={preference: True})
        _, published = await s.run()
        assert opt_ins_of(published) == {(early, True)}, published
        # opted in or out 5 s before the last run began (after the first run's overlap),
        # listed now
        await s.edit(late, preferences={preference: flipped},
                     stamped_ago_s=time.monotonic() - s.began + 5)
        _, published = await s.run()
        assert opt_ins_of(published) == set(), published
        short = await checkpoint.get(s.bed.store, ACCOUNT)
        assert first is not None and short is not None
        assert short.covered == first.covered  # none of those reads was full
        # both clocks move on past twice the overlap from what was surely read
        s.ahead[0] = 61.0
        await s.sim.clock(offset_s=61.0)
        _, published = await s.run()
        # (what the runs between published is not published again: either the last read's
        # ids skip it, or the ledger is asked whether it knows it; here nothing reconciled it)
        assert (late, flipped) in opt_ins_of(published), published
        assert opt_ins_of(published) <= {(late, flipped), (early, True)}, published
        full = await checkpoint.get(s.bed.store, ACCOUNT)
        assert full is not None and full.covered is not None and short.covered is not None
        assert full.covered > short.covered  # that read was full
        # and the next run (our clock as it is: the full read's start was measured on it)
        # reads from where that one began again: nothing to publish
        s.ahead[0] = 0.0
        _, published = await s.run()
        assert opt_ins_of(published) == set(), published
        after = await checkpoint.get(s.bed.store, ACCOUNT)
        assert after is not None and after.covered == full.covered  # not full


async def test_an_opt_in_stamped_after_dotdigitals_clock_went_back_is_read_at_once(
        tmp_path: Path) -> None:
    """dotdigital's clock steps back 20 s between two runs: what is stamped after the step is
    stamped before where the previous read began, and the run that finds the step reads the
    feed in full from further back (:mod:`common.vendors.dotdigital.overlap`, rule 6)."""
    async with scene(tmp_path, overlap_s=30.0, preference_count=1) as s:
        (preference,) = s.preferences
        email = s.emails[0]
        values = {o.preference_id: o.is_opted_in
                  for o in (await s.client.subscriptions(email)).opt_ins}
        flipped = not values.get(preference, False)
        await s.run()
        await s.run()
        before = await feed_position(preference).get(s.bed.store, ACCOUNT)
        await s.sim.clock(offset_s=-20.0)
        await s.edit(email, preferences={preference: flipped})
        _, published = await s.run()
        assert opt_ins_of(published) == {(email, flipped)}, published
        after = await feed_position(preference).get(s.bed.store, ACCOUNT)
        assert before is not None and after is not None and after.since is not None
        assert before.since is not None and after.since < before.since
        # that read was full, on the clock as it is now
        assert after.covered == after.since - timedelta(seconds=30)
        _, published = await s.run()
        assert opt_ins_of(published) == set(), published


def opt_ins_of(published: Sequence[Change]) -> set[tuple[str, bool]]:
    """(email, opted in) of each opt-in published."""
    return {(c.email, c.opted_in) for c in published if isinstance(c, PreferenceChange)}


def resumed(published: Sequence[Change], email: str) -> list[str]:
    """The resubscriptions published for ``email``."""
    return [c.status for c in published if isinstance(c, ContactStatusChange)
            and c.email == email and c.change_id.startswith("ec-active:")]


def feed_statuses(published: Sequence[Change], email: str) -> list[str]:
    """The statuses published for ``email`` with its opt-ins (the suppressions feed's aside)."""
    return [c.status for c in published if isinstance(c, ContactStatusChange)
            and c.email == email and c.change_id.startswith("ec-status:")]


async def test_a_contact_in_five_feeds_has_its_status_published_once_a_run(
        tmp_path: Path) -> None:
    async with scene(tmp_path, preference_count=5, states="all") as s:
        email = s.emails[0]
        _, published = await s.run()
        read = {c.preference_id for c in published
                if isinstance(c, PreferenceChange) and c.email == email}
        assert len(s.preferences) == 5 and read == set(s.preferences), published
        assert feed_statuses(published, email) == ["Subscribed"], published


async def test_a_status_that_changes_between_feeds_in_a_run_is_published_again(
        tmp_path: Path) -> None:
    # one feed at a time: the later ones are read after the change
    async with scene(tmp_path, preference_count=5, states="all", max_concurrency=1) as s:
        email = s.emails[0]

        async def unsubscribes() -> None:  # after the first feed's page was read
            await s.edit(email, status="Unsubscribed")

        s.publisher.before_changes = unsubscribes
        _, published = await s.run()
        assert feed_statuses(published, email) == ["Subscribed", "Unsubscribed"], published


async def test_a_read_under_way_keeps_the_last_complete_reads_watermark(
        tmp_path: Path) -> None:
    # The writer reads the feed from the watermark before it writes: every position a later
    # read saves on its way keeps the last complete read's, so writes are not held meanwhile.
    async with scene(tmp_path, preference_count=1, states="all") as s:
        await s.run()
        checkpoint = feed_position(s.preferences[0])
        finished = await checkpoint.get(s.bed.store, ACCOUNT)
        assert finished is not None and finished.watermark is not None
        saved: list[FeedPosition] = []
        store = s.bed.store
        set_checkpoint = store.set_checkpoint

        async def noted(account: str, name: str, value: str) -> None:
            if name == checkpoint.name:
                saved.append(FeedPosition.decode(value))
            await set_checkpoint(account, name, value)

        store.set_checkpoint = noted
        await s.edit(s.emails[0], preferences={s.preferences[0]: False})
        await s.run()
        under_way = [position for position in saved if position.min_contact_id is not None]
        assert under_way, saved
        assert {position.watermark for position in under_way} == {finished.watermark}, saved
        assert saved[-1].min_contact_id is None and saved[-1].watermark is not None, saved


async def test_feeds_are_read_side_by_side(tmp_path: Path) -> None:
    async with scene(tmp_path, preference_count=3, states="all", max_concurrency=4) as s:
        first = s.preferences[0]
        await s.sim.faults(latency_ms={f"GET /v2/contacts/with-preference/{first}/": 1500})
        made, _ = await s.run()
        await s.sim.faults()
        assert made[OPT_INS] == 3, made
        # the slow first feed did not hold up the others: their changes went out before its
        order = [c.preference_id for c in s.publisher.changes if isinstance(c, PreferenceChange)]
        assert order[0] != first and order[-1] == first, order


@examples(200)
@given(rows=st.lists(st.tuples(
    st.text(min_size=1, max_size=12), st.integers(-2**63, 2**63 - 1), st.booleans(),
    st.integers(-10**11, 10**11), st.text(max_size=12)), max_size=5))
def test_preference_changes_built_a_column_at_a_time_equal_the_constructors(
        rows: list[tuple[str, int, bool, int, str]]) -> None:
    timed = [(email, preference_id, opted_in, T0 + timedelta(milliseconds=milliseconds),
              change_id) for email, preference_id, opted_in, milliseconds, change_id in rows]
    built = preference_changes(
        emails=(row[0] for row in timed), preference_ids=(row[1] for row in timed),
        opted_in=(row[2] for row in timed), origin_times=(row[3] for row in timed),
        change_ids=(row[4] for row in timed), count=len(timed))
    assert built == [PreferenceChange(email=email, preference_id=preference_id,
                                      opted_in=opted_in, origin_time=origin_time,
                                      change_id=change_id)
                     for email, preference_id, opted_in, origin_time, change_id in timed]
    assert [type(change) for change in built] == [PreferenceChange] * len(rows)


def _answer(contact_id: int, email: str, status: str,
            *opt_ins: tuple[int, bool, datetime]) -> ContactOptIns:
    """A contact as a direct read answers it, with its opt-ins (preference, opted in, when)."""
    return ContactOptIns(contact=Contact(id=contact_id, email=email, status=status),
                         opt_ins=tuple(PreferenceOptIn(preference_id=preference_id,
                                                       is_opted_in=opted_in, modified=modified)
                                       for preference_id, opted_in, modified in opt_ins))


def test_contacts_read_directly_keep_every_opt_in_with_its_change_id() -> None:
    at = datetime(2026, 1, 1, 9, 40, 18, 527_000, tzinfo=UTC)
    read = contacts_read([
        _answer(5, "A@example.com", "Subscribed", (7, True, at), (8, False, T0)),
        _answer(6, "b@example.com", "Suppressed"),
        _answer(9, "c@example.com", "Subscribed", (7, False, T0))])
    assert read == ContactsRead(
        contact_ids=[5, 6, 9], emails=["A@example.com", "b@example.com", "c@example.com"],
        statuses=["Subscribed", "Suppressed", "Subscribed"], owners=[0, 0, 2],
        preference_ids=[7, 8, 7], opted_in=[True, False, False], modified=[at, T0, T0],
        change_ids=["ec:5:7:2026-01-01T09:40:18.527000+00:00", opt_in_change_id(5, 8, T0),
                    opt_in_change_id(9, 7, T0)])


def _expected_changes(read: ContactsRead, places: Sequence[int], started: datetime,
                      statuses_sent: dict[int, str]) -> tuple[list[ContactStatusChange],
                                                             list[PreferenceChange]]:
    """The changes of the contacts at ``places``, one contact at a time, with the public
    constructors."""
    statuses: list[ContactStatusChange] = []
    opt_ins: list[PreferenceChange] = []
    for place in places:
        try:
            email = normalize_email(read.emails[place])
        except ValueError:
            continue
        contact_id, status = read.contact_ids[place], read.statuses[place]
        if statuses_sent.get(contact_id) != status:
            statuses_sent[contact_id] = status
            statuses.append(ContactStatusChange(email=email, status=status,
                                                origin_time=started,
                                                change_id=f"ec-status:{contact_id}"))
        opt_ins += [PreferenceChange(email=email, preference_id=read.preference_ids[opt_in],
                                     opted_in=read.opted_in[opt_in],
                                     origin_time=read.modified[opt_in],
                                     change_id=read.change_ids[opt_in])
                    for opt_in, owner in enumerate(read.owners) if owner == place]
    return statuses, opt_ins


@pytest.mark.parametrize("places", [[0, 1, 2, 3], [0, 2], [3], []])
@pytest.mark.parametrize("malformed", [False, True])
def test_a_pages_changes_are_each_contacts_status_then_its_opt_ins(
        places: list[int], malformed: bool) -> None:
    at = datetime(2026, 1, 1, 9, 40, 18, 527_000, tzinfo=UTC)
    read = contacts_read([
        _answer(5, " A@Example.com", "Subscribed", (7, True, at), (8, False, T0)),
        _answer(6, "not an email" if malformed else "b@x.com", "Suppressed", (7, True, T0)),
        _answer(8, "c@x.com", "Subscribed"),
        _answer(9, "d@x.com", "Subscribed", (7, False, T0))])
    # contact 9's status went out earlier in the run; contact 5's was another
    sent, expected_sent = {9: "Subscribed", 5: "Unsubscribed"}, {9: "Subscribed",
                                                                  5: "Unsubscribed"}
    expected = _expected_changes(read, places, at, expected_sent)
    statuses, opt_ins = EcPoller._changes_from(read, places, at, statuses_sent=sent)
    assert (statuses.changes(), opt_ins.changes()) == expected and sent == expected_sent
    assert [type(c) for c in statuses.changes()] == [ContactStatusChange] * len(expected[0])
    if places == [0, 1, 2, 3] and not malformed:
        assert len(opt_ins) == 4 and statuses.emails == ["a@example.com", "b@x.com", "c@x.com"]


@examples(300)
@given(pages=st.lists(st.lists(st.tuples(st.integers(0, 60), st.integers(-20, 40)),
                               max_size=12), max_size=6),
       limit=st.integers(1, 5))
def test_a_read_holds_only_the_newest_ids_it_keeps_and_keeps_what_holding_all_would(
        pages: list[list[tuple[int, int]]], limit: int) -> None:
    """``Seen`` against holding every id read and keeping the newest at the end: the same ids'
    times kept, the same ``seen_from``, never more than twice the kept ids held."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ec_poller, "SEEN_LIMIT", limit)
        keep_from = T0
        seen = Seen(keep_from=keep_from)
        every: dict[str, datetime] = {}
        for page in pages:
            ids = [f"c{contact}" for contact, _ in page]
            times = [T0 + timedelta(seconds=offset) for contact, offset in page]
            # a change id stands for one stamp: the same contact's id is read again at its time
            times = [every.get(i, t) for i, t in zip(ids, times, strict=True)]
            seen.add(ids, times)
            every.update((i, t) for i, t in zip(ids, times, strict=True) if t >= keep_from)
            assert len(seen.ids) <= 2 * limit
        newest = sorted(every.values(), reverse=True)[:limit]
        stored = seen.stored()
        assert sorted((every[i] for i in seen.ids), reverse=True) == newest
        assert stored["seen"] == [ec_poller.seen_key(i) for i in seen.ids]
        assert stored.get("seen_from") == (newest[-1].isoformat() if len(every) > limit else None)


def test_a_read_from_where_the_previous_began_keeps_what_that_one_kept() -> None:
    """A read of the overlap keeps its ids; the reads from where the previous began that
    follow keep them on, with their own: the next read of the overlap finds every id it reads
    again among them, and looks none up in the ledger (no ``seen_from``). A checkpoint of an
    earlier release (no stamps) is not kept on."""
    at = [T0 + timedelta(seconds=s) for s in (35, 50, 62)]
    full = Seen(keep_from=T0 + timedelta(seconds=30), read_from=T0)
    full.add(["a", "b"], at[:2])
    before = SeenBefore.of(full.stored())
    follow = Seen(keep_from=T0 + timedelta(seconds=30), read_from=T0 + timedelta(seconds=60),
                  before=before)
    follow.add(["c"], at[2:])
    stored = follow.stored()
    assert stored["seen"] == [ec_poller.seen_key(i) for i in ("c", "b", "a")]
    assert "seen_from" not in stored
    # kept alone, from where it began: what is stamped before that is looked up
    old = SeenBefore.of({"seen": full.stored()["seen"]})
    assert (old.earlier, old.earlier_from) == ({}, None)
    alone = Seen(keep_from=T0 + timedelta(seconds=30), read_from=T0 + timedelta(seconds=60))
    alone.add(["c"], at[2:])
    assert alone.stored()["seen"] == [ec_poller.seen_key("c")]
    assert alone.stored()["seen_from"] == (T0 + timedelta(seconds=60)).isoformat()


@examples(500)
@given(stamps=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 90)), max_size=40),
       reads=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 25), st.integers(0, 40)),
                      min_size=1, max_size=7),
       limit=st.integers(1, 40))
def test_reads_keep_on_what_the_reads_before_kept_and_vouch_for_no_more(
        stamps: list[tuple[int, int]], reads: list[tuple[int, int, int]], limit: int) -> None:
    """A feed read over and over, each read starting where the previous began or earlier
    (rule 3 of ``Seen``), each keeping on what the one before kept: after every read, each id
    any read saw, stamped at or after its ``keep_from``, is in the checkpoint unless its stamp
    is one the checkpoint leaves to the ledger (``seen_from`` and before); every id there was
    read; never more than ``SEEN_LIMIT``."""
    feed = {f"c{contact}@{at}": T0 + timedelta(seconds=at) for contact, at in stamps}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ec_poller, "SEEN_LIMIT", limit)
        before = SeenBefore(skip=set())
        started = T0 + timedelta(seconds=30)
        read_ids: set[str] = set()
        for gap, back, keep_back in reads:
            read_from = started - timedelta(seconds=back)   # where the previous began, or earlier
            started += timedelta(seconds=gap)
            keep_from = started - timedelta(seconds=keep_back)
            seen = Seen(keep_from=keep_from, read_from=read_from, before=before)
            listed = sorted((at, i) for i, at in feed.items() if read_from <= at <= started)
            for page in (listed[:3], listed[3:]):
                seen.add([i for _, i in page], [at for at, _ in page])
            read_ids |= {i for _, i in listed}
            stored = seen.stored()
            before = SeenBefore.of(stored)
            kept = set(stored["seen"])
            assert len(kept) <= limit
            assert kept <= {ec_poller.seen_key(i) for i in read_ids}
            since = datetime.fromisoformat(stored["seen_since"])
            unkept = stored.get("seen_from")
            assert unkept is None or datetime.fromisoformat(unkept) == since
            assert since >= keep_from and (unkept is not None or since == keep_from)
            for i in read_ids:
                at = feed[i]
                if at >= keep_from and (at > since or unkept is None):
                    assert ec_poller.seen_key(i) in kept, (i, stored)
