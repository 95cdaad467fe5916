"""The ``prefsync`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

SERVICES = ("dynamics-poller", "ec-poller", "reconciler", "writer")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="config file (default: $PREFSYNC_CONFIG, then ./prefsync.toml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefsync",
        description="Two-way marketing-preference sync between Dynamics 365 and dotdigital.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run all four services in one process")
    _add_config(up)

    run = sub.add_parser("run", help="run one service in this process")
    run.add_argument("service", choices=SERVICES)
    _add_config(run)
    run.add_argument("--metrics-port", type=int, default=None,
                     help="serve /metrics, /healthz and /readyz on this port")

    sim = sub.add_parser("sim", help="run a vendor API simulator")
    sim_sub = sim.add_subparsers(dest="simulator", required=True, metavar="SIMULATOR")
    dyn = sim_sub.add_parser("dynamics", help="the Dataverse Web API simulator")
    dyn.add_argument("--host", default="127.0.0.1")
    dyn.add_argument("--port", type=int, default=8081)
    dyn.add_argument("--client", action="append", default=[], metavar="TENANT:CLIENT_ID:SECRET",
                     help="an OAuth client (repeatable); none: a demo client is created")
    dyn.add_argument("--state", type=Path, default=None, help="keep data in this file")
    dd = sim_sub.add_parser("dotdigital", help="the dotdigital API simulator")
    dd.add_argument("--host", default="127.0.0.1")
    dd.add_argument("--port", type=int, default=8082)
    dd.add_argument("--account", action="append", default=[], metavar="ID:API_USER:PASSWORD",
                    help="an account and its API user (repeatable); none: a demo account")
    dd.add_argument("--state", type=Path, default=None, help="keep data in this file")

    now = sub.add_parser("sync-now", help="start a sync of one account now")
    now.add_argument("account")
    _add_config(now)
    now.add_argument("--wait", action="store_true",
                     help="wait until what this run read is reconciled and written")
    now.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")

    demo = sub.add_parser("demo", help="simulators + services + a sync, end to end")
    demo.add_argument("--records", type=int, default=2000)
    demo.add_argument("--broker-url", default=os.environ.get(
        "PREFSYNC_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/"))

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("PREFSYNC_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from common.broker import BrokerUnavailable
    from common.config import ConfigError

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
    if args.command == "sim":
        if args.simulator == "dynamics":
            from services.simulators.dynamics import run_dynamics

            await run_dynamics(host=args.host, port=args.port, clients=args.client,
                               state_file=args.state)
        else:
            from services.simulators.dotdigital import run_dotdigital

            await run_dotdigital(host=args.host, port=args.port, accounts=args.account,
                                 state_file=args.state)
        return 0
    if args.command == "demo":
        from services.demo import run_demo

        return await run_demo(records=args.records, broker_url=args.broker_url)

    from common.config import load_config

    config = load_config(args.config)
    if args.command == "up":
        from services.runtime import run_services

        await run_services(config=config, services=SERVICES)
        return 0
    if args.command == "run":
        from services.runtime import run_services

        await run_services(config=config, services=(args.service,),
                           metrics_port=args.metrics_port)
        return 0
    if args.command == "sync-now":
        from services.sync_now import sync_now

        return await sync_now(config=config, account=args.account, wait=args.wait,
                              timeout_s=args.timeout)
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
