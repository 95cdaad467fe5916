"""The ``prefsync`` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SERVICES = ("dynamics-poller", "ec-poller", "reconciler", "writer")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="config file (default: $PREFSYNC_CONFIG, then ./prefsync.toml)")


def _add_serving(parser: argparse.ArgumentParser, *, port_default: str) -> None:
    """The options of a command that runs services: its config and its metrics port."""
    _add_config(parser)
    parser.add_argument("--metrics-port", type=int, default=None,
                        help=f"serve /metrics, /healthz and /readyz on this port ({port_default})")
    # Loopback by default: /metrics names accounts and /readyz the dependencies; containers
    # (compose) pass 0.0.0.0 so that Prometheus can scrape them on the internal network.
    parser.add_argument("--metrics-host",
                        default=os.environ.get("PREFSYNC_METRICS_HOST", "127.0.0.1"),
                        help="address for the metrics port (default $PREFSYNC_METRICS_HOST, "
                             "then 127.0.0.1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefsync",
        description="Two-way marketing-preference sync between Dynamics 365 and dotdigital.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run all four services in one process")
    _add_serving(up, port_default="default: [metrics] port, 9464")

    run = sub.add_parser("run", help="run one service in this process")
    run.add_argument("service", choices=SERVICES)
    _add_serving(run, port_default="default: none; 0: any free port")

    sim = sub.add_parser("sim", help="run a vendor API simulator")
    sim_sub = sim.add_subparsers(dest="simulator", required=True, metavar="SIMULATOR")
    for name, text, port, (option, metavar, option_help) in (
            ("dynamics", "the Dataverse Web API simulator", 8081,
             ("--client", "TENANT:CLIENT_ID:SECRET",
              "an OAuth client (repeatable); none: a demo client is created")),
            ("dotdigital", "the dotdigital API simulator", 8082,
             ("--account", "ID:API_USER:PASSWORD",
              "an account and its API user (repeatable); none: a demo account"))):
        simulator = sim_sub.add_parser(name, help=text)
        simulator.add_argument("--host", default="127.0.0.1")
        simulator.add_argument("--port", type=int, default=port)
        simulator.add_argument(option, action="append", default=[], metavar=metavar,
                               help=option_help)
        simulator.add_argument("--state", type=Path, default=None, help="keep data in this file")
    seed = sim_sub.add_parser("seed", help="seed both running simulators with sample data")
    seed.add_argument("--dynamics", default="http://127.0.0.1:8081", metavar="URL")
    seed.add_argument("--dotdigital", default="http://127.0.0.1:8082", metavar="URL")
    seed.add_argument("--account", default="demo", help="the prefsync account id (Dynamics side)")
    seed.add_argument("--dotdigital-account", default="1001")
    seed.add_argument("--records", type=int, default=2000)
    seed.add_argument("--preferences", type=int, default=5)
    seed.add_argument("--seed", type=int, default=7)
    seed.add_argument("--wait", type=float, default=60.0,
                      help="seconds to wait for the simulators to answer")

    now = sub.add_parser("sync-now", help="start a sync of one account now")
    now.add_argument("account")
    _add_config(now)
    now.add_argument("--wait", action="store_true",
                     help="wait until what this run read is reconciled and written")
    now.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    now.add_argument("--dry-run", action="store_true",
                     help="read both sides and reconcile in this process; print what would be "
                          "applied each way, write and commit nothing")
    now.add_argument("--json", action="store_true", help="with --dry-run: the report as JSON")
    now.add_argument("--limit", type=int, default=5, metavar="N",
                     help="with --dry-run: sample emails per group (default 5)")

    schedule = sub.add_parser("schedule", help="show or change an account's sync schedule "
                                               "(takes effect without a restart)")
    schedule.add_argument("account")
    schedule.add_argument("schedule", nargs="?", default=None,
                          help="'manual', 'every 30m' (s, m, h, d) or 'daily 02:00 Europe/London'")
    schedule.add_argument("--clear", action="store_true",
                          help="go back to the schedule in the config")
    _add_config(schedule)

    status = sub.add_parser("status", help="sync status: queued, running, last success, next "
                                           "run, counts")
    status.add_argument("account", nargs="?", default=None, help="default: every account")
    status.add_argument("--json", action="store_true")
    _add_config(status)

    for name, text in (("prefs", "one email's preferences, contact methods and contact status"),
                       ("history", "every change seen for one email and what the sync decided")):
        view = sub.add_parser(name, help=text)
        view.add_argument("account")
        view.add_argument("email")
        if name == "prefs":
            view.add_argument("--filter", default="all",
                              choices=("all", "opted-in", "opted-out", "private", "public"))
        view.add_argument("--json", action="store_true")
        _add_config(view)

    _add_console(sub)

    forget = sub.add_parser("forget", help="erase everything prefsync holds for one email in "
                                           "one account (not the vendors' data)")
    forget.add_argument("account")
    forget.add_argument("email")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _add_config(forget)

    replay = sub.add_parser("replay", help="feed an account's logged changes through again")
    replay.add_argument("account")
    _add_config(replay)
    replay.add_argument("--since", required=True, metavar="TIME",
                        help="ISO 8601 time (UTC if no zone) or a duration ago: 90m, 6h, 2d")
    replay.add_argument("--until", default=None, metavar="TIME", help="default: the end of the log")
    replay.add_argument("--dry-run", action="store_true",
                        help="print what would be fed; publish nothing")
    replay.add_argument("--no-wait", action="store_true",
                        help="do not follow the replayed changes through the services")
    replay.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to follow them (default 600)")

    dlq = sub.add_parser("dlq", help="list, show, replay or purge dead letters")
    dlq.add_argument("action", choices=("list", "show", "replay", "purge"))
    _add_config(dlq)
    dlq.add_argument("--account", default=None, help="one account (default: every account)")
    dlq.add_argument("--reason", default=None,
                     help="only entries whose reason, code or reason text matches")
    dlq.add_argument("--id", action="append", default=[], dest="ids", metavar="MESSAGE_ID",
                     help="only this entry (repeatable)")

    health = sub.add_parser("healthcheck", help="exit 0 when URL answers 2xx (container checks)")
    health.add_argument("url")
    health.add_argument("--timeout", type=float, default=3.0)

    broker = sub.add_parser("broker", help="RabbitMQ set-up")
    broker_sub = broker.add_subparsers(dest="broker_command", required=True, metavar="ACTION")
    setup = broker_sub.add_parser(
        "setup", help="per-account users confined by topic permissions, exchanges and queues "
                      "(safe to run again)")
    _add_config(setup)
    setup.add_argument("--rabbitmqctl", default="rabbitmqctl",
                       help="the rabbitmqctl to apply users and permissions with (on the "
                            "broker's host)")
    setup.add_argument("--print-definitions", action="store_true",
                       help="print the users and permissions as a definitions document for "
                            "the management HTTP API (POST /api/definitions); change nothing")
    setup.add_argument("--declare-only", action="store_true",
                       help="declare exchanges and queues and check each user's confinement; "
                            "the users were applied another way (the HTTP API)")

    demo = sub.add_parser("demo", help="simulators + services + a sync, end to end")
    demo.add_argument("--records", type=int, default=2000)
    demo.add_argument("--broker-url", default=os.environ.get(
        "PREFSYNC_BROKER_URL", "amqp://127.0.0.1:5672/"))  # no user: RabbitMQ's local default
    demo.add_argument("--keep", action="store_true",
                      help="leave the simulators, the services and the console running after "
                           "the story, until Ctrl-C")
    demo.add_argument("--console-port", type=int, default=8090,
                      help="the console's port (default 8090; any free port if it is taken)")

    bench = sub.add_parser("bench", help="the benchmark suite: scenarios against their "
                                         "targets, results in bench/results (source checkout)")
    _add_bench(bench)

    return parser


def _add_console(sub: Any) -> None:
    """``prefsync console`` and its alias ``prefsync api`` (the same app: pages and JSON)."""
    for name, text in (("console", "the operator console in the browser, with the JSON API"),
                       ("api", "the same as console (its JSON routes: status, preferences, "
                               "history)")):
        console = sub.add_parser(name, help=text)
        console.add_argument("--host", default="127.0.0.1",
                             help="address to bind (default 127.0.0.1; another address needs "
                                  "tokens)")
        console.add_argument("--port", type=int, default=8090)
        console.add_argument("--token-env", default=None, metavar="NAME",
                             help="the admin token (every account) from this environment "
                                  "variable, instead of [api] admin_token_env; account tokens: "
                                  "[accounts.api] token_env")
        console.add_argument("--tls-cert", type=Path, default=None, metavar="FILE",
                             help="serve HTTPS with this certificate (PEM; with --tls-key)")
        console.add_argument("--tls-key", type=Path, default=None, metavar="FILE")
        _add_config(console)


async def _console(args: argparse.Namespace, config: Any) -> int:
    from services.cli.console.app import console_command

    return await console_command(config=config, host=args.host, port=args.port,
                                 token_env=args.token_env, tls_cert=args.tls_cert,
                                 tls_key=args.tls_key)


def _add_bench(parser: argparse.ArgumentParser) -> None:
    try:
        from bench.cli import add_arguments
    except ImportError:  # installed without the source tree, where bench/ lives
        parser.add_argument("rest", nargs=argparse.REMAINDER)
        return
    add_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from common.ops import failpoints  # noqa: F401 - read once, here, to name a bad setting
    except ValueError as exc:
        print(f"prefsync: bad config: {exc}", file=sys.stderr)
        return 2
    from common.ops.logs import configure_logging

    configure_logging(service=getattr(args, "service", None) or None)
    if args.command == "healthcheck":
        from common.ops.health import healthcheck

        return healthcheck(args.url, timeout_s=args.timeout)
    if args.command == "bench":
        try:
            from bench.cli import run as run_bench
        except ImportError:
            print("prefsync: the benchmark suite runs from a source checkout (bench/)",
                  file=sys.stderr)
            return 2
        return run_bench(args)
    from common.config import ConfigError
    from common.messaging.amqp import BrokerUnavailable

    try:
        return asyncio.run(_dispatch(args))
    except ConfigError as exc:
        print(f"prefsync: bad config: {exc}", file=sys.stderr)
        return 2
    except BrokerUnavailable as exc:
        print(f"prefsync: {exc}\n  start RabbitMQ (e.g. `rabbitmq-server -detached`, or "
              "`docker compose up -d rabbitmq`) or set PREFSYNC_BROKER_URL", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


async def _dispatch(args: argparse.Namespace) -> int:
    from common.config import load_config
    from services.runtime.collector import tune_collector  # once a long-lived process starts

    if args.command == "sim":
        if args.simulator == "seed":
            from services.cli.sim_seed import seed_simulators

            return await seed_simulators(
                dynamics_url=args.dynamics, dotdigital_url=args.dotdigital, account=args.account,
                dotdigital_account=args.dotdigital_account, records=args.records,
                preferences=args.preferences, seed=args.seed, wait_s=args.wait)
        if args.simulator == "dynamics":
            from services.simulators.dynamics import run_dynamics

            tune_collector()
            await run_dynamics(host=args.host, port=args.port, clients=args.client,
                               state_file=args.state)
        else:
            from services.simulators.dotdigital import run_dotdigital
            from services.simulators.dotdigital.accounts import AccountError

            try:
                tune_collector()
                await run_dotdigital(host=args.host, port=args.port, accounts=args.account,
                                     state_file=args.state)
            except AccountError as exc:  # the simulator knows nothing of prefsync's config
                print(f"prefsync: bad config: {exc}", file=sys.stderr)
                return 2
        return 0
    if args.command == "demo":
        from services.cli.demo import run_demo

        return await run_demo(records=args.records, broker_url=args.broker_url, keep=args.keep,
                              console_port=args.console_port)

    config = load_config(args.config)
    if args.command == "up":
        from services.runtime.registry import run_services

        port = config.metrics.port if args.metrics_port is None else args.metrics_port
        tune_collector()
        await run_services(config=config, services=SERVICES, metrics_port=port,
                           metrics_host=args.metrics_host)
        return 0
    if args.command == "run":
        from services.runtime.registry import run_services

        tune_collector()
        await run_services(config=config, services=(args.service,),
                           metrics_port=args.metrics_port, metrics_host=args.metrics_host)
        return 0
    if args.command == "replay":
        from services.cli.replay import replay_command

        return await replay_command(config=config, account=args.account, since=args.since,
                                    until=args.until, dry_run=args.dry_run,
                                    wait=not args.no_wait, timeout_s=args.timeout)
    if args.command == "dlq":
        from services.cli.dlq import dlq_command

        return await dlq_command(config=config, action=args.action, account=args.account,
                                 reason=args.reason, ids=args.ids)
    if args.command == "broker":
        from services.cli.broker_setup import BrokerSetupError, setup_broker

        try:
            return await setup_broker(config=config, rabbitmqctl=args.rabbitmqctl,
                                      print_definitions=args.print_definitions,
                                      declare_only=args.declare_only)
        except BrokerSetupError as exc:
            print(f"prefsync: broker setup: {exc}", file=sys.stderr)
            return 1
    if args.command == "schedule":
        from services.cli.schedule import schedule_command

        return await schedule_command(config=config, account=args.account, text=args.schedule,
                                      clear=args.clear)
    if args.command in ("console", "api"):
        return await _console(args, config)
    if args.command in ("status", "prefs", "history"):
        return await _show(args, config)
    if args.command == "forget":
        from services.cli.erasure import forget_command

        return await forget_command(config=config, account=args.account, email=args.email,
                                    yes=args.yes)
    if args.command == "sync-now" and args.dry_run:
        from services.cli.dry_run import dry_run_command

        return await dry_run_command(config=config, account=args.account, as_json=args.json,
                                     limit=args.limit)
    if args.command == "sync-now":
        from services.cli.sync_now import sync_now

        return await sync_now(config=config, account=args.account, wait=args.wait,
                              timeout_s=args.timeout)
    raise AssertionError(args.command)


async def _show(args: argparse.Namespace, config: Any) -> int:
    """The read-only views: status, prefs, history."""
    from services.cli import prefs

    if args.command == "status":
        return await prefs.show_status(config=config, account=args.account, as_json=args.json)
    if args.command == "prefs":
        return await prefs.show_preferences(config=config, account=args.account,
                                            email=args.email, wanted=args.filter,
                                            as_json=args.json)
    if args.command == "history":
        return await prefs.show_history(config=config, account=args.account, email=args.email,
                                        as_json=args.json)
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
