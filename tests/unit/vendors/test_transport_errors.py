"""Both vendor clients: a vendor that cannot be reached is a transport error (after the retries),
and neither it, nor the client, nor the config shows the client's secret."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import pytest

from common.vendors.base import RetryPolicy, TransportError
from common.vendors.dataverse.client import DataverseClient
from common.vendors.dotdigital.client import DotdigitalClient
from tests.unit.vendors.support import (
    DD_PASSWORD,
    SECRET,
    SimControl,
    assert_hidden,
    dotdigital_config,
    dotdigital_sim,
    dynamics_config,
    dynamics_sim,
)

pytestmark = pytest.mark.anyio


@dataclass(frozen=True, kw_only=True)
class Vendor:
    sim: Callable[[], AbstractAsyncContextManager[SimControl]]
    config: Callable[[str], Any]
    client: Callable[..., Any]
    call: Callable[[Any], Awaitable[Any]]  # any call that reaches the vendor
    secret: str


VENDORS = {
    "dataverse": Vendor(sim=dynamics_sim, config=dynamics_config, client=DataverseClient,
                        call=lambda client: client.service_document(), secret=SECRET),
    "dotdigital": Vendor(sim=dotdigital_sim, config=dotdigital_config, client=DotdigitalClient,
                         call=lambda client: client.server_time(), secret=DD_PASSWORD),
}


@pytest.mark.parametrize("name", sorted(VENDORS))
async def test_a_secret_never_shows_in_reprs_or_transport_errors(
        name: str, caplog: pytest.LogCaptureFixture) -> None:
    vendor = VENDORS[name]
    caplog.set_level(logging.DEBUG)
    async with vendor.sim() as sim:
        config = vendor.config(sim.url)
    # The simulator is gone: connection refused, retried, then a transport error.
    async with vendor.client(config=config,
                             retry=RetryPolicy(attempts=2, base_delay_s=0.001)) as client:
        with pytest.raises(TransportError) as caught:
            await vendor.call(client)
        assert_hidden((vendor.secret,), caught.value, client, config, caplog.text)
