"""``prefsync sync-now ACCOUNT --dry-run [--json] [--limit N]``: what a sync would do, without doing it.

It runs the same read and reconcile as a real sync, in this process: the dynamics-poller's run
(catalog, record directory, eligibility, subscription rows), then the ec-poller's part as the
dynamics-poller starts it (the same eligible emails or full read), then every change message
through the reconciler, shard by shard in the order they were published, in batches of the
services' size. Three seams keep it from changing anything:

1. the ledger store is a copy-on-write view (:mod:`services.cli.dry_run.overlay`): reads fall
   through to the ledger, writes stay in memory and are dropped at the end, so no key state,
   history row, checkpoint or delta token moves and the next real sync reads the same changes;
2. the publisher captures what the services would publish (changes, write commands, triggers,
   progress events): nothing reaches the broker;
3. the vendor clients are read-only: anything but a GET is refused before it is sent, and the
   catalog mirror only counts what it would write.

What it reports:

- read from each side, and the reconciler's outcomes (counted as ``sync-now --wait`` counts
  them);
- the writes each side would receive (opt-ins and opt-outs), one per key and side: the last
  command of a key whose value is still the register's (the writer drops a superseded one);
- the same per preference; up to ``--limit`` sample emails per group; dotdigital writes
  deferred until a complete read of their preference (a real run writes them later).

A real sync afterwards gives the same counts as long as nothing changed in between, save for
outcomes of a key changed on both sides, which depend on the order the two sides' changes reach
the reconciler (here: Dynamics first, as a real run mostly has it); the writes do not.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TextIO

import orjson

from common.config import Config
from common.domain import PreferenceKey
from common.messaging.amqp import Delivery, Outgoing
from common.messaging.envelope import EligibleContact, WriteCommand, decode
from common.messaging.publishing import CapturingPublisher
from common.messaging.topology import CHANGES_EXCHANGE, CONTROL_EXCHANGE, WRITES_EXCHANGE, Topology
from common.runs import RunRequest, new_run_id
from common.store import open_store
from common.store.checkpoints import PREFERENCE_TREE
from common.vendors.dataverse.catalog import entries_of_tree, load_tree
from common.vendors.dataverse.client import DataverseClient
from common.vendors.dotdigital.client import DotdigitalClient
from services.cli.dry_run.overlay import OverlayStore
from services.dynamics_poller.service import DynamicsPoller
from services.ec_poller.service import EcPoller
from services.reconciler.service import Reconciler
from services.runtime.registry import SHARD_BATCH

SIDES = ("dotdigital", "dynamics")
DEFAULT_LIMIT = 5


def _progress_events(published: CapturingPublisher) -> list[dict[str, Any]]:
    return [orjson.loads(i.body) for i in published.on(CONTROL_EXCHANGE)
            if ".progress." in i.routing_key]


@dataclass(frozen=True)
class _Message:
    """A change message as its shard queue would deliver it, first time (nothing is ever
    settled: the dry run acks nothing)."""

    body: bytes
    message_id: str
    headers: dict[str, Any]
    exchange: str
    routing_key: str
    redelivered: bool = False

    def stale(self) -> bool:
        return False

    async def settle(self, *, ack: bool) -> bool:
        return True


def _deliveries(account: str, items: Sequence[Outgoing]) -> dict[int, list[Delivery]]:
    """The change messages as each shard queue would deliver them (publish order)."""
    by_shard: dict[int, list[Delivery]] = defaultdict(list)
    for item in items:
        shard = int(item.routing_key.rsplit(".", 1)[-1])
        message = _Message(body=item.body, message_id=item.message_id,
                           headers=dict(item.headers), exchange=item.exchange,
                           routing_key=item.routing_key)
        by_shard[shard].append(Delivery(envelope=decode(item.body), message=message,
                                        queue=Topology.changes_queue(account, shard)))
    return by_shard


def _ec_request(account: str, publisher: CapturingPublisher) -> RunRequest | None:
    """The ec-poller's part of the run, as the dynamics-poller's trigger asks for it."""
    for item in publisher.on(CONTROL_EXCHANGE):
        if item.routing_key == Topology.trigger_key(account, "ec-poller"):
            envelope = decode(item.body)
            run_id = envelope.run_id or envelope.change_id
            return RunRequest(
                run_id=run_id, covers=(run_id,),
                eligible_emails=tuple(c.email for c in envelope.changes
                                      if isinstance(c, EligibleContact)),
                reasons=(str(envelope.extra.get("reason", "")),))
    return None


@dataclass
class DryRun:
    account: str
    run: str
    read: dict[str, int] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)
    # (side, opted in) -> the email of each key written (an email once per preference);
    # per preference: "to_<side>" -> opt_in / opt_out -> count, "outcomes" -> outcome -> count
    writes: dict[tuple[str, bool], list[str]] = field(default_factory=dict)
    by_preference: dict[int, dict[str, Counter[str]]] = field(default_factory=dict)
    outcome_emails: dict[str, list[str]] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    deferred: int = 0
    catalog: dict[str, Any] = field(default_factory=dict)

    def applied(self, side: str) -> int:
        return sum(len(self.writes.get((side, v), ())) for v in (True, False))

    def as_dict(self, *, limit: int) -> dict[str, Any]:
        def group(side: str, opted_in: bool) -> list[str]:
            return self.writes.get((side, opted_in), [])

        return {
            "account": self.account,
            "dry_run": True,
            "run": self.run,
            "read": self.read,
            "applied_to_dotdigital": self.applied("dotdigital"),
            "applied_to_dynamics": self.applied("dynamics"),
            "writes": {side: {"opt_in": len(group(side, True)), "opt_out": len(group(side, False))}
                       for side in SIDES},
            "outcomes": dict(sorted(self.outcomes.items())),
            "by_preference": [
                {"preference_id": preference, "name": self.names.get(preference, ""),
                 **{k: dict(sorted(v.items())) for k, v in sorted(counts.items())}}
                for preference, counts in sorted(self.by_preference.items())],
            "deferred": self.deferred,
            "catalog": self.catalog,
            "samples": {
                **{f"to_{side}_{'opt_in' if v else 'opt_out'}": list(dict.fromkeys(group(side, v)))[:limit]
                   for side in SIDES for v in (True, False)},
                **{f"outcome_{o}": emails[:limit]
                   for o, emails in sorted(self.outcome_emails.items())}},
        }


async def dry_run(*, config: Config, account: str) -> DryRun:
    """Read both sides and reconcile what was read, as a sync would, changing nothing."""
    settings = config.account(account)
    shards = config.broker.shards
    run_id = new_run_id()
    async with open_store(config.store.url) as ledger, \
            DataverseClient(config=settings.dynamics, read_only=True) as dataverse, \
            DotdigitalClient(config=settings.dotdigital, read_only=True) as dotdigital:
        view = OverlayStore(ledger)
        read = CapturingPublisher()
        poller = DynamicsPoller(account=settings, client=dataverse, store=view, publisher=read,
                                shards=shards, dotdigital=dotdigital, mirror=False)
        await poller.run_cycle(RunRequest(run_id=run_id, covers=(run_id,),
                                          reasons=("sync-now",)))
        ec_request = _ec_request(account, read)
        if ec_request is not None:
            await EcPoller(account=settings, client=dotdigital, store=view, publisher=read,
                           shards=shards).run_cycle(ec_request)
        polled = len(view.history_rows)  # the pollers' own (ineligible) rows come first
        reconciled = CapturingPublisher()
        reconciler = Reconciler(account=account, store=view, publisher=reconciled,
                                shards=shards,
                                future_tolerance=timedelta(seconds=settings.future_tolerance_s))
        for _, deliveries in sorted(_deliveries(account, read.on(CHANGES_EXCHANGE)).items()):
            for start in range(0, len(deliveries), SHARD_BATCH):
                await reconciler.handle(deliveries[start:start + SHARD_BATCH])
        result = DryRun(account=account, run=run_id)
        for event in _progress_events(read):
            if event.get("event") == "poller-done":
                result.read[str(event["source"])] = int(event.get("read", 0))
                if event["source"] == "dynamics":
                    result.catalog = dict(event.get("catalog") or {})
        for event in _progress_events(reconciled):
            if event.get("event") == "reconciled":
                result.outcomes.update(event.get("outcomes") or {})
        await _writes(result, view, reconciled.on(WRITES_EXCHANGE))
        _outcomes_by_preference(result, view, polled)
        result.deferred = len(view.deferred_now())
        tree = await load_tree(view, account) if await view.get_checkpoint(
            account, PREFERENCE_TREE.name) else []
        result.names = {e.preference_id: e.public_name or e.name for e in entries_of_tree(tree)}
    return result


async def _writes(result: DryRun, view: OverlayStore, items: Sequence[Outgoing]) -> None:
    """One write per key and side: its last command, if the register still holds its value."""
    last: dict[tuple[str, int, str], WriteCommand] = {}
    for item in items:
        for command in decode(item.body).changes:
            if isinstance(command, WriteCommand):
                last[(command.email, command.preference_id, command.side)] = command
    states = await view.load(PreferenceKey(account=result.account, email=e, preference_id=p)
                             for e, p, _ in last)
    writes: dict[tuple[str, bool], list[str]] = defaultdict(list)
    for (email, preference, side), command in sorted(last.items()):
        state = states.get(PreferenceKey(account=result.account, email=email,
                                         preference_id=preference))
        if state is None or state.register is None \
                or state.register.opted_in != command.opted_in:
            continue  # superseded: the writer would drop it
        writes[(side, command.opted_in)].append(email)
        counts = result.by_preference.setdefault(preference, {})
        counts.setdefault(f"to_{side}", Counter())["opt_in" if command.opted_in else "opt_out"] += 1
    result.writes = {k: sorted(v) for k, v in writes.items()}  # an email per key written


def _outcomes_by_preference(result: DryRun, view: OverlayStore, start: int) -> None:
    emails: dict[str, set[str]] = defaultdict(set)
    for row in view.history_rows[start:]:
        if row.decision == "future_timestamp":
            continue  # noted beside the decision, which is counted
        counts = result.by_preference.setdefault(row.preference_id, {})
        counts.setdefault("outcomes", Counter())[row.decision] += 1
        emails[row.decision].add(row.email)
    result.outcome_emails = {o: sorted(e) for o, e in emails.items()}


def format_dry_run(report: dict[str, Any]) -> str:
    """The report for people (``--json`` prints ``report`` itself)."""
    read, writes, outcomes = report["read"], report["writes"], report["outcomes"]

    def split(side: str) -> str:
        w = writes[side]
        return f"{w['opt_in'] + w['opt_out']} to {_name(side)} " \
               f"({w['opt_in']} opt-ins, {w['opt_out']} opt-outs)"

    lines = [
        f"dry run of {report['account']}: nothing was written, published or committed",
        f"  read: {read.get('dynamics', 0)} from Dynamics, {read.get('dotdigital', 0)} "
        f"from dotdigital",
        f"  would apply: {split('dotdigital')}, {split('dynamics')}",
        "  outcomes: " + (", ".join(f"{o} {n}" for o, n in outcomes.items()) or "none"),
    ]
    if report["deferred"]:
        lines.append(f"  deferred: {report['deferred']} dotdigital write(s) wait for a complete "
                     "read of their preference")
    catalog = report["catalog"]
    if any(catalog.get(k) for k in ("created", "updated", "deactivated")):
        lines.append(f"  catalog: would create {catalog.get('created', 0)}, update "
                     f"{catalog.get('updated', 0)}, deactivate {catalog.get('deactivated', 0)} "
                     "preference row(s) in Dynamics")
    if report["by_preference"]:
        lines.append("  by preference:")
        for entry in report["by_preference"]:
            parts = [f"{o} {n}" for o, n in entry.get("outcomes", {}).items()]
            for side in SIDES:
                w = entry.get(f"to_{side}", {})
                if w:
                    parts.append(f"to {_name(side)} {w.get('opt_in', 0)} in / "
                                 f"{w.get('opt_out', 0)} out")
            label = f"{entry['preference_id']} {entry['name']!r}" if entry["name"] \
                else str(entry["preference_id"])
            lines.append(f"    {label}: {', '.join(parts)}")
    samples = {k: v for k, v in report["samples"].items() if v}
    if samples:
        lines.append("  samples:")
        lines += [f"    {k.replace('_', ' ')}: {', '.join(v)}" for k, v in samples.items()]
    return "\n".join(lines)


def _name(side: str) -> str:
    return "Dynamics" if side == "dynamics" else "dotdigital"


async def dry_run_command(*, config: Config, account: str, as_json: bool,
                          limit: int = DEFAULT_LIMIT, out: TextIO = sys.stdout) -> int:
    result = await dry_run(config=config, account=account)
    report = result.as_dict(limit=max(0, limit))
    if as_json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode(), file=out)
    else:
        print(format_dry_run(report), file=out)
    return 0
