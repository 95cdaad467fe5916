"""A local simulator of the Dataverse (Dynamics 365) Web API, as strict as the real one.

It serves the identity platform's client-credentials token endpoint and the Web API
(``/api/data/v9.0|v9.1|v9.2``) over the tables a marketing-preference sync needs: contacts,
leads, accounts, marketing lists with their members, and our solution's
``psync_marketingpreferences`` and ``psync_marketingpreferencesubscriptions``. It covers
queries and paging, change tracking, conditional writes and upserts, ``$batch``, service
protection limits, and the ``/_sim/`` control surface. Each module's docstring states the
behaviours it implements and which of them are inferred rather than documented.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from aiohttp import web

from ..base import Stats, serve
from .app import DynamicsApp, build
from .limits import ServiceLimits

__all__ = ["DynamicsSimulator", "ServiceLimits", "run_dynamics"]


class DynamicsSimulator:
    """One simulated Dataverse organisation.

    ``clients`` are ``"TENANT:CLIENT_ID:SECRET"`` strings; with none, one demo client is
    generated and exposed as :attr:`demo_client`.
    """

    def __init__(self, *, clients: Sequence[str] = (), state_file: Path | None = None,
                 change_tracking_retention: timedelta = timedelta(days=7),
                 token_lifetime_s: int = 3599, limits: ServiceLimits | None = None) -> None:
        self._sim, self.demo_client = build(
            clients=tuple(clients), state_file=state_file, retention=change_tracking_retention,
            token_lifetime_s=token_lifetime_s, limits=limits)
        self.app: web.Application = self._sim.app

    @property
    def internals(self) -> DynamicsApp:
        """The organisation's state (store, clock, limits), for tools that run in-process."""
        return self._sim

    @property
    def stats(self) -> Stats:
        """Its call counters (``GET /_sim/stats``), for tools that run in-process."""
        return self._sim.control.stats

    def save(self) -> bool:
        """Write the state file, if one is configured."""
        return self._sim.save()


async def run_dynamics(*, host: str, port: int, clients: Sequence[str],
                       state_file: Path | None) -> None:
    """Serve the simulator until cancelled or sent SIGTERM; save the state file (if any)."""
    sim = DynamicsSimulator(clients=clients, state_file=state_file)
    if sim.demo_client is not None:
        tenant, client_id, secret = sim.demo_client
        print(f"Dynamics simulator demo client: tenant={tenant} client_id={client_id} "
              f"secret={secret}", flush=True)

    def ready(bound: int) -> None:
        print(f"Dynamics simulator listening on http://{host}:{bound} "
              f"(token endpoint http://{host}:{bound}/<tenant>/oauth2/v2.0/token)", flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = asyncio.create_task(serve(sim.app, host=host, port=port, ready=ready))
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({server, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if server.done():
            server.result()  # e.g. the port is taken
    finally:
        for task in (server, stopper):
            task.cancel()
        await asyncio.gather(server, stopper, return_exceptions=True)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
        sim.save()
