"""Account isolation enforced by RabbitMQ: after ``prefsync broker setup``, a process connected
as account A's user is refused everything outside A, whatever it tries.

The refusals are what is tested (not the setup calls): a permission that matched nothing would
let these through.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import aio_pika
import aiormq
import orjson
import pytest

from common.config import AccountBrokerConfig, Config, Secret, load_config
from common.messaging.amqp import account_broker_url
from common.messaging.envelope import Envelope, WriteCommand, encode
from common.messaging.topology import (
    CHANGES_EXCHANGE,
    CONTROL_EXCHANGE,
    DEAD_EXCHANGE,
    WRITES_EXCHANGE,
    ExchangeSpec,
    Topology,
    TopologyError,
)
from services.cli.broker_setup import BrokerSetupError, check_isolation

from .conftest import BROKER_URL, delete_users, require_rabbitmqctl

pytestmark = pytest.mark.anyio

SHARED = (CHANGES_EXCHANGE, WRITES_EXCHANGE, CONTROL_EXCHANGE, DEAD_EXCHANGE)


@dataclass
class Accounts:
    config: Config
    config_path: Path
    env: dict[str, str]
    a: str
    b: str

    @property
    def a_url(self) -> str:
        return account_broker_url(self.config.broker.url, self.config.account(self.a))


def _write(path: Path, accounts: list[str]) -> None:
    lines = [f'[broker]\nurl = "{BROKER_URL}"\nshards = 2\n',
             f'[store]\nurl = "sqlite:///{path.parent}/ledger.db"\n']
    for i, account in enumerate(accounts):
        lines.append(f'''[[accounts]]
id = "{account}"
[accounts.dynamics]
url = "http://127.0.0.1:9"
token_url = "http://127.0.0.1:9/t/oauth2/v2.0/token"
client_id = "x"
client_secret_env = "ISO_SECRET"
[accounts.dotdigital]
url = "http://127.0.0.1:9"
api_user = "apiuser-{i}@apiconnector.com"
password_env = "ISO_SECRET"
[accounts.broker]
password_env = "ISO_BROKER_{i}"
''')
    path.write_text("\n".join(lines))


def setup(config_path: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", "broker", "setup", "--config",
                           str(config_path), *extra], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def accounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Accounts]:
    require_rabbitmqctl()
    a, b = f"iso-{secrets.token_hex(3)}", f"iso-{secrets.token_hex(3)}"
    env = {"ISO_SECRET": "unused", "ISO_BROKER_0": "A-" + secrets.token_urlsafe(12),
           "ISO_BROKER_1": "B-" + secrets.token_urlsafe(12)}
    path = tmp_path_factory.mktemp("isolation") / "prefsync.toml"
    _write(path, [a, b])
    config = load_config(path, env=env)
    try:
        first = setup(path, env)
        assert first.returncode == 0, first.stderr + first.stdout
        again = setup(path, env)                         # safe to run again
        assert again.returncode == 0, again.stderr + again.stdout
        assert again.stdout.count("confined") == 2, again.stdout
        yield Accounts(config=config, config_path=path, env=env, a=a, b=b)
    finally:
        delete_users(*(acct.broker.user for acct in config.accounts))
        asyncio.run(_delete_queues([a, b]))


async def _delete_queues(accounts: list[str]) -> None:
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        for queue in Topology(accounts=accounts, shards=2).queues:
            await channel.queue_delete(queue.name)


async def refused(action: Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]],
                  url: str) -> bool:
    """Whether the broker refuses ``action`` for ``url``'s user (access refused, 403)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        try:
            await action(channel)
        except aiormq.exceptions.ChannelAccessRefused:
            return True
        return False


def forged_write(account: str) -> bytes:
    now = datetime.now(UTC)
    return encode(Envelope(
        type="write-commands", account=account, source="reconciler", change_id="forged",
        origin_time=now, changes=(WriteCommand(
            email="ann@example.com", preference_id=1, side="dotdigital", opted_in=True,
            origin_time=now, origin_side="dynamics", change_id="forged"),)))


async def publish_by_name(channel: aio_pika.abc.AbstractChannel, *, queue: str) -> None:
    """Through the default exchange, which routes by queue name."""
    await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=queue)


async def publish(channel: aio_pika.abc.AbstractChannel, exchange: str, key: str,
                  body: bytes = b"{}") -> None:
    target = await channel.get_exchange(exchange, ensure=True)
    await target.publish(aio_pika.Message(body), routing_key=key, mandatory=False)


async def test_own_prefix_is_accepted(accounts: Accounts) -> None:
    for exchange in SHARED:
        assert not await refused(
            partial(publish, exchange=exchange, key=f"{accounts.a}.probe"), accounts.a_url)


async def test_publishing_for_another_account_is_refused(accounts: Accounts) -> None:
    b = accounts.b
    for exchange in SHARED:
        assert await refused(partial(publish, exchange=exchange, key=f"{b}.probe"),
                             accounts.a_url)
    # a write command for B, on B's own routing key: refused, and B's queue stays empty
    assert await refused(lambda ch: publish(ch, WRITES_EXCHANGE,
                                            Topology.writes_key(b, "dotdigital", 0),
                                            forged_write(b)), accounts.a_url)
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        queue = await (await connection.channel()).declare_queue(
            Topology.writes_queue(b, "dotdigital", 0), passive=True)
        assert queue.declaration_result.message_count == 0


async def test_the_default_exchange_reaches_no_queue_by_name(accounts: Accounts) -> None:
    """The default exchange routes by queue name, around every topic permission: refused."""
    for account in (accounts.b, accounts.a):
        queue = Topology.writes_queue(account, "dotdigital", 0)
        assert await refused(partial(publish_by_name, queue=queue), accounts.a_url)
    assert await refused(lambda ch: publish(ch, "amq.topic", f"{accounts.a}.probe"),
                         accounts.a_url)


async def test_binding_outside_its_prefix_is_refused(accounts: Accounts) -> None:
    async def bind(channel: aio_pika.abc.AbstractChannel, key: str) -> None:
        queue = await channel.declare_queue(exclusive=True)   # a listener of its own
        await queue.bind(CHANGES_EXCHANGE, routing_key=key)

    assert not await refused(lambda ch: bind(ch, f"{accounts.a}.changes.#"), accounts.a_url)
    # a listener on a robust connection (aio-pika names its queue itself)
    robust = await aio_pika.connect_robust(accounts.a_url)
    async with robust:
        listener = await (await robust.channel()).declare_queue(exclusive=True, auto_delete=True)
        await listener.bind(CONTROL_EXCHANGE, routing_key=f"{accounts.a}.progress.#")
    for key in (f"{accounts.b}.changes.#", "#", "*.changes.*"):
        assert await refused(partial(bind, key=key), accounts.a_url), key


async def test_other_accounts_queues_and_the_shared_exchanges_are_out_of_reach(
        accounts: Accounts) -> None:
    b_queue = Topology.changes_queue(accounts.b, 0)

    async def consume(channel: aio_pika.abc.AbstractChannel) -> None:
        async def ack(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()

        queue = await channel.get_queue(b_queue, ensure=False)
        await queue.consume(ack)

    async def purge(channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.get_queue(b_queue, ensure=False)
        await queue.purge()

    async def get(channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.get_queue(b_queue, ensure=False)
        await queue.get(fail=False)

    async def declare(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_queue(f"prefsync.{accounts.b}.mine", auto_delete=True)

    assert await refused(consume, accounts.a_url)
    assert await refused(get, accounts.a_url)
    assert await refused(declare, accounts.a_url)
    assert await refused(lambda ch: ch.queue_delete(b_queue), accounts.a_url)
    assert await refused(purge, accounts.a_url)
    assert await refused(lambda ch: ch.exchange_delete(CHANGES_EXCHANGE), accounts.a_url)
    # its own queues are its own
    assert not await refused(lambda ch: ch.declare_queue(Topology.changes_queue(accounts.a, 0),
                                                         passive=True), accounts.a_url)


async def test_wrong_password_is_refused(accounts: Accounts) -> None:
    url = accounts.a_url.replace(accounts.env["ISO_BROKER_0"], "not-the-password")
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(url)


def test_declare_only_checks_users_applied_another_way(accounts: Accounts) -> None:
    checked = setup(accounts.config_path, accounts.env, "--declare-only",
                    "--rabbitmqctl", "/nonexistent/rabbitmqctl")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.count("confined") == 2


def test_definitions_carry_hashes_never_passwords(accounts: Accounts) -> None:
    printed = setup(accounts.config_path, accounts.env, "--print-definitions")
    assert printed.returncode == 0, printed.stderr
    document = orjson.loads(printed.stdout)
    users = {u["name"] for u in document["users"]}
    assert users == {f"prefsync-{accounts.a}", f"prefsync-{accounts.b}"}
    for secret in (accounts.env["ISO_BROKER_0"], accounts.env["ISO_BROKER_1"]):
        assert secret not in printed.stdout
    exchanges = {(p["user"], p["exchange"]) for p in document["topic_permissions"]}
    assert len(exchanges) == 2 * len(SHARED)


async def test_setup_fails_when_a_user_is_not_confined(accounts: Accounts) -> None:
    """The check behind ``broker setup``: a user with no topic permissions (here the
    administrator) can publish anywhere, and setup says so instead of reporting success."""
    unconfined = replace(accounts.config.account(accounts.a), broker=AccountBrokerConfig(
        user="guest", password=Secret("guest")))
    with pytest.raises(BrokerSetupError, match="topic permissions are not in force"):
        await check_isolation(accounts.config, unconfined)


async def test_services_on_their_own_user_name_a_missing_exchange() -> None:
    """An account's own user cannot declare the shared exchanges; if setup has not made them,
    start-up says so."""

    class Unset(Topology):
        exchanges = (ExchangeSpec(name=f"prefsync.missing-{secrets.token_hex(4)}"),)

    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        with pytest.raises(TopologyError, match="prefsync broker setup"):
            await Unset(accounts=[], shards=1).declare(await connection.channel(),
                                                       exchanges_too=False)
