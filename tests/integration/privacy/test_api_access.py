"""``prefsync api`` access: a token per account and an admin token, 404 for another account's
data, no token-less bind beyond loopback, and live Dataverse lookups cached and limited per
token."""

from __future__ import annotations

import asyncio
import hmac
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.config import Config, ConfigError, DynamicsConfig, Secret, parse_config
from services.cli import api as api_access
from services.cli.api import ApiAccess, LiveLookups, api_share, check_bind, is_loopback
from services.cli.console.app import serving_console
from services.cli.prefs import api_app, api_resources
from services.simulators.base import serving
from services.simulators.dynamics import DynamicsSimulator

from .ledger import hold

pytestmark = pytest.mark.anyio

ANN = "ann@example.com"
ENV = {"SECRET": "dyn-secret", "ACME_TOKEN": "acme-t0ken", "BETA_TOKEN": "beta-t0ken",
       "ADMIN_TOKEN": "admin-t0ken"}


def make_config(tmp_path: Path, dyn_url: str = "http://127.0.0.1:1", *,
                tokens: bool = True, lookups_per_minute: int = 30) -> Config:
    def account(account_id: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": account_id,
            "dynamics": {"url": dyn_url, "token_url": f"{dyn_url}/demo/oauth2/v2.0/token",
                         "client_id": "prefsync-demo", "client_secret_env": "SECRET",
                         # the API's twentieth of it paces no test
                         "requests_per_window": 120_000},
            "dotdigital": {"url": "http://127.0.0.1:1", "api_user": "u",
                           "password_env": "SECRET"}}
        if tokens:
            entry["api"] = {"token_env": f"{account_id.upper()}_TOKEN"}
        return entry

    raw: dict[str, Any] = {
        "broker": {"url": "amqp://127.0.0.1/"},
        "store": {"url": f"sqlite:///{tmp_path}/ledger.db"},
        "accounts": [account("acme"), account("beta")],
        "api": {"lookups_per_minute": lookups_per_minute},
    }
    if tokens:
        raw["api"]["admin_token_env"] = "ADMIN_TOKEN"
    return parse_config(raw, env=ENV)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def api(config: Config, *, clock: Clock | None = None,
              token: Secret | None = None) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    async with api_resources(config) as (store, clients):
        await hold(store, account="acme", email=ANN, record="rec-ann")
        lookups = LiveLookups(clients=clients, per_minute=config.api.lookups_per_minute,
                              clock=clock or Clock())
        app = api_app(config=config, store=store, dataverse=clients, token=token,
                      lookups=lookups)
        async with serving(app) as base, aiohttp.ClientSession(base_url=base) as http:
            yield base, http


async def get(http: aiohttp.ClientSession, path: str,
              token: str | None) -> tuple[int, Any, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(path, headers=headers) as response:
        return response.status, await response.json(), dict(response.headers)


async def test_an_account_token_opens_its_own_account_only(tmp_path: Path) -> None:
    async with api(make_config(tmp_path)) as (_, http):
        acme, beta, admin = ENV["ACME_TOKEN"], ENV["BETA_TOKEN"], ENV["ADMIN_TOKEN"]
        history = f"/accounts/acme/contacts/{ANN}/history"
        code, body, _ = await get(http, history, acme)
        assert code == 200 and body["history"]
        assert (await get(http, "/accounts/acme/status", acme))[0] == 200

        # another account's token: 404, exactly as for an account that does not exist
        code, body, _ = await get(http, history, beta)
        assert code == 404 and body == {"error": "no account 'acme'"}
        for path in ("/accounts/beta/status", f"/accounts/beta/contacts/{ANN}/history",
                     f"/accounts/beta/contacts/{ANN}/preferences"):
            assert (await get(http, path, acme))[:2] == (404, {"error": "no account 'beta'"})
        assert (await get(http, "/accounts/nope/status", acme))[:2] == \
            (404, {"error": "no account 'nope'"})
        assert (await get(http, "/accounts/beta/status", beta))[0] == 200

        # the admin token opens both; no token or a wrong one opens none
        assert (await get(http, history, admin))[0] == 200
        assert (await get(http, "/accounts/beta/status", admin))[0] == 200
        for token in (None, "wrong", acme + "x", acme[:-1]):
            assert (await get(http, history, token))[0] == 401
        async with http.get(history, headers={"Authorization": f"Basic {acme}"}) as response:
            assert response.status == 401


async def test_token_env_is_the_admin_token(tmp_path: Path) -> None:
    """``prefsync api --token-env NAME`` gives the admin token, in place of the config's."""
    async with api(make_config(tmp_path), token=Secret("from-the-command-line")) as (_, http):
        for account in ("acme", "beta"):
            assert (await get(http, f"/accounts/{account}/status",
                              "from-the-command-line"))[0] == 200
        assert (await get(http, "/accounts/acme/status", ENV["ADMIN_TOKEN"]))[0] == 401
        assert (await get(http, "/accounts/acme/status", ENV["ACME_TOKEN"]))[0] == 200


async def test_every_token_is_compared_in_constant_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    access = ApiAccess(config=make_config(tmp_path))
    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", compare)
    caller = access.caller(f"Bearer {ENV['ADMIN_TOKEN']}")  # the first one configured
    assert caller is not None and caller.name == "admin" and caller.account is None
    assert len(compared) == 3  # admin and both accounts, though the first matched
    assert all(len(a) == len(b) == 32 for a, b in compared)  # digests: lengths do not show
    assert access.caller(f"Bearer {ENV['BETA_TOKEN']}") == api_access.Caller(
        name="account:beta", account="beta")
    assert access.caller("Bearer nope") is None and len(compared) == 9


def test_two_callers_never_share_a_token(tmp_path: Path) -> None:
    raw: dict[str, Any] = {
        "broker": {"url": "amqp://127.0.0.1/"}, "store": {"url": "sqlite:///x.db"},
        "api": {"admin_token_env": "ADMIN_TOKEN"},
        "accounts": [{"id": "acme", "api": {"token_env": "ADMIN_TOKEN"},
                      "dynamics": {"url": "http://d", "token_url": "http://d/t",
                                   "client_id": "c", "client_secret_env": "SECRET"},
                      "dotdigital": {"url": "http://e", "api_user": "u",
                                     "password_env": "SECRET"}}]}
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env=ENV)
    assert str(info.value).startswith("accounts[0].api.token: the same token as api.admin_token")
    assert ENV["ADMIN_TOKEN"] not in str(info.value)
    raw["accounts"][0]["api"] = {"token_env": "UNSET"}
    with pytest.raises(ConfigError, match=r"^accounts\[0\]\.api\.token_env: "):
        parse_config(raw, env=ENV)


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.0.0.5", "192.168.1.2", "api.example.com",
                 "localhost.example.com"):
        assert not is_loopback(host), host


async def test_no_token_no_bind_beyond_loopback(tmp_path: Path) -> None:
    open_config = make_config(tmp_path, tokens=False)
    with pytest.raises(ConfigError, match="without API tokens"):
        check_bind("0.0.0.0", ApiAccess(config=open_config))
    check_bind("127.0.0.1", ApiAccess(config=open_config))
    check_bind("0.0.0.0", ApiAccess(config=make_config(tmp_path)))  # tokens: allowed
    check_bind("0.0.0.0", ApiAccess(config=open_config, admin_token=Secret("t")))
    with pytest.raises(ConfigError, match="without API tokens"):
        async with serving_console(open_config, host="0.0.0.0"):
            pass
    # without tokens, on loopback, it answers anyone (as before)
    async with api(open_config) as (_, http):
        assert (await get(http, f"/accounts/acme/contacts/{ANN}/history", None))[0] == 200


async def test_the_api_command_refuses_a_public_bind_without_tokens(tmp_path: Path) -> None:
    config_path = tmp_path / "prefsync.toml"
    config_path.write_text(f'[broker]\nurl = "amqp://127.0.0.1/"\n[store]\n'
                           f'url = "sqlite:///{tmp_path}/ledger.db"\n'
                           '[[accounts]]\nid = "acme"\n[accounts.dynamics]\n'
                           'url = "http://127.0.0.1:1"\ntoken_url = "http://127.0.0.1:1/t"\n'
                           'client_id = "c"\nclient_secret_env = "SECRET"\n'
                           '[accounts.dotdigital]\nurl = "http://127.0.0.1:1"\napi_user = "u"\n'
                           'password_env = "SECRET"\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "api", "--host", "0.0.0.0", "--port", "0",
        "--config", str(config_path), env={**os.environ, "SECRET": "s"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2, (out, err)
    assert b"--host: refusing to serve personal data on '0.0.0.0' without API tokens" in err


def dataverse_reads(stats: dict[str, Any]) -> int:
    return sum(n for route, n in stats["calls"].items() if route.startswith("GET /api/data"))


async def test_live_lookups_are_cached_and_limited_per_token(tmp_path: Path) -> None:
    dynamics = DynamicsSimulator(clients=[f"demo:prefsync-demo:{ENV['SECRET']}"])
    clock = Clock()
    async with serving(dynamics.app) as dyn_url, aiohttp.ClientSession() as sim, \
            api(make_config(tmp_path, dyn_url, lookups_per_minute=2), clock=clock) as (_, http):
        async def reads() -> int:
            async with sim.get(f"{dyn_url}/_sim/stats") as response:
                return dataverse_reads(await response.json())

        async def prefs(email: str, token: str) -> tuple[int, Any, dict[str, str]]:
            return await get(http, f"/accounts/acme/contacts/{email}/preferences", token)

        acme, admin = ENV["ACME_TOKEN"], ENV["ADMIN_TOKEN"]
        code, body, _ = await prefs(ANN, acme)
        assert code == 200 and body["contact_methods"] == [] and body["eligible"]
        per_lookup = await reads()
        assert per_lookup == 3  # contacts, leads, accounts with that email
        assert (await prefs(ANN, acme))[0] == 200 and await reads() == per_lookup  # cached
        assert (await prefs(ANN, admin))[0] == 200 and await reads() == per_lookup  # cached
        assert (await prefs("bob@example.com", acme))[0] == 200  # the second lookup this minute
        assert await reads() == 2 * per_lookup

        code, body, headers = await prefs("cy@example.com", acme)  # a third: refused
        assert code == 429 and headers["Retry-After"] == "30" and "lookups" in body["error"]
        assert await reads() == 2 * per_lookup  # nothing was asked of Dataverse
        assert (await prefs("cy@example.com", admin))[0] == 200  # the admin's own allowance
        clock.now += 30  # one lookup refilled
        assert (await prefs("dee@example.com", acme))[0] == 200
        assert (await prefs("eve@example.com", acme))[0] == 429
        assert await reads() == 4 * per_lookup
        clock.now += 30  # the cached answers of a minute ago have expired
        assert (await prefs(ANN, acme))[0] == 200 and await reads() == 5 * per_lookup


def test_the_api_has_a_twentieth_of_the_dataverse_budget() -> None:
    config = DynamicsConfig(url="http://d", token_url="http://d/t", client_id="c",
                            client_secret=Secret("s"), scope="s", requests_per_window=6000,
                            max_concurrency=16)
    shared = api_share(config)
    assert shared.requests_per_window == 300 and shared.max_concurrency == 3
    assert shared.window_s == config.window_s and shared.url == config.url
    assert api_share(DynamicsConfig(url="http://d", token_url="http://d/t", client_id="c",
                                    client_secret=Secret("s"), scope="s",
                                    requests_per_window=10)).requests_per_window == 1
