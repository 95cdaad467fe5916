"""The operations endpoint of a running service: ``/metrics``, ``/healthz`` and ``/readyz``.

- ``/healthz``: the process is alive and its event loop answers (always 200 while it runs).
- ``/readyz``: 200 only when the broker connection is up, the ledger store answers, every
  consumer is consuming and no dependency's circuit breaker is open (:mod:`common.messaging.breakers`);
  otherwise 503. Both answer JSON naming each check (``dependencies_down`` names the open
  breakers).
- ``/metrics``: the Prometheus text format (:mod:`common.ops.metrics`).

While it serves, it also polls the depth of each account's dead-letter queue (a passive
declare, every ``poll_s`` seconds), so the "dead letters present" alert also sees messages the
broker dead-lettered itself (delivery limit) without a service having counted them.

``prefsync healthcheck URL`` is the client side, for container health checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol, TextIO

import orjson
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from common.messaging.breakers import Breakers
from common.messaging.topology import Topology
from common.ops.metrics import CONTENT_TYPE, Metrics
from common.store.checkpoints import READINESS_PROBE
from common.store.interface import Checkpoints

log = logging.getLogger("prefsync.health")

STORE_TIMEOUT_S = 2.0
DEAD_LETTER_POLL_S = 15.0


class Consuming(Protocol):
    @property
    def queue(self) -> str: ...

    @property
    def consuming(self) -> asyncio.Event: ...


class ServiceState(Protocol):
    """What readiness looks at (``services.runtime.registry.Running``)."""

    @property
    def consumers(self) -> Sequence[Consuming]: ...

    @property
    def connection(self) -> AbstractRobustConnection | None: ...

    @property
    def store(self) -> Checkpoints | None: ...

    @property
    def breakers(self) -> Breakers: ...


async def readiness(state: ServiceState) -> dict[str, Any]:
    """Each check's result and ``ready`` (all passed)."""
    connection = state.connection
    broker = connection is not None and not connection.is_closed and connection.connected.is_set()
    store_ok = False
    if state.store is not None:
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                await state.store.get_checkpoint("-", READINESS_PROBE)
            store_ok = True
        except Exception as exc:  # any failure means "not reachable"
            log.warning("ledger store not reachable: %s", type(exc).__name__)
    idle = [c.queue for c in state.consumers if not c.consuming.is_set()]
    consuming = bool(state.consumers) and not idle
    down = sorted(state.breakers.down())
    checks: dict[str, Any] = {"broker": broker, "store": store_ok, "consuming": consuming}
    if idle:
        checks["not_consuming"] = idle[:20]
    if down:
        checks["dependencies_down"] = down
    return {"ready": broker and store_ok and consuming and not down, "checks": checks}


def health_app(*, state: ServiceState, metrics: Metrics) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def readyz(_: web.Request) -> web.Response:
        result = await readiness(state)
        return web.Response(body=orjson.dumps(result), content_type="application/json",
                            status=200 if result["ready"] else 503)

    async def metrics_page(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


async def poll_dead_letters(*, state: ServiceState, metrics: Metrics, accounts: Sequence[str],
                            service: str, every_s: float = DEAD_LETTER_POLL_S) -> None:
    while True:
        connection = state.connection
        if connection is not None and connection.connected.is_set():
            try:
                channel = await connection.channel()
                try:
                    for account in accounts:
                        queue = await channel.declare_queue(Topology.dead_letter_queue(account),
                                                            passive=True)
                        depth = queue.declaration_result.message_count or 0
                        metrics.dead_letter_depth.labels(service, account).set(depth)
                finally:
                    await channel.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the queue may not be declared yet; try again later
                log.debug("dead-letter depth poll failed: %s", exc)
        await asyncio.sleep(every_s)


@asynccontextmanager
async def serve_health(*, running: ServiceState, metrics: Metrics, accounts: Sequence[str],
                       service: str, host: str, port: int) -> AsyncIterator[str]:
    """Serve the endpoints on ``host:port`` (0: a free port); yields the base URL."""
    runner = web.AppRunner(health_app(state=running, metrics=metrics), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    sockets = getattr(site._server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    url = f"http://{host}:{bound}"
    log.info("serving /metrics, /healthz and /readyz", extra={"url": url})
    poller = asyncio.create_task(poll_dead_letters(state=running, metrics=metrics,
                                                   accounts=accounts, service=service))
    try:
        yield url
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await runner.cleanup()


def healthcheck(url: str, *, timeout_s: float = 3.0, out: TextIO = sys.stdout) -> int:
    """GET ``url``: exit code 0 on a 2xx answer, 1 otherwise (for container health checks)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {getattr(exc, 'reason', exc)}", file=out)
        return 1
    healthy = 200 <= status < 300
    print(f"{'healthy' if healthy else 'unhealthy'}: {url}: {status}", file=out)
    return 0 if healthy else 1
