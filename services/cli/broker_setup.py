"""``prefsync broker setup``: a RabbitMQ user per account, confined to that account by the broker.

Every routing key starts with the account id, on topic exchanges, so RabbitMQ's topic permissions
can enforce isolation. For each account with a broker password (``[accounts.broker]
password_env`` / ``password_file``), setup makes its user (``[accounts.broker] user``, default
``prefsync-<account>``) and gives it:

- resource permissions: configure its own queues (``prefsync.<account>.*``) and exclusive
  listener queues (``amq.gen-*`` named by the broker, ``amq_<uuid>`` by aio-pika's robust
  connections: a ``sync-now --wait`` listener, the status recorder); write and read those plus the four
  shared exchanges by their exact names. Nothing else: not the default exchange (which would
  reach any queue by name), no other account's queues, no configure on the shared exchanges
  (which would let it delete them);
- topic permissions on each shared exchange (by its exact name, as RabbitMQ requires): publish
  and bind only routing keys that start with ``<account>.``.

Then it declares the exchanges and every account's queues (as the ``[broker] url`` user), and
checks the result the only way that proves it: it connects as each account's user and expects
its own prefix to be accepted and another prefix to be **refused**. Safe to run again: users'
passwords and permissions are set to what the config says, declarations are idempotent.

Users and permissions are applied as a RabbitMQ definitions document, with ``rabbitmqctl
import_definitions`` on the broker's host. ``--print-definitions`` prints that document instead
(password hashes, never passwords), for the management HTTP API (``POST /api/definitions``);
``--declare-only`` then declares and checks without rabbitmqctl.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import orjson

from common.config import AccountConfig, Config
from common.messaging.amqp import account_broker_url, connect
from common.messaging.topology import (
    CHANGES_EXCHANGE,
    CONTROL_EXCHANGE,
    DEAD_EXCHANGE,
    WRITES_EXCHANGE,
    Topology,
)

SHARED_EXCHANGES = (CHANGES_EXCHANGE, WRITES_EXCHANGE, CONTROL_EXCHANGE, DEAD_EXCHANGE)
# Exclusive listener queues, named by the broker or by aio-pika's robust connections; they can
# only be bound under the account's own prefix (topic permissions) and only their connection
# can read them.
LISTENERS = r"amq\.gen-.*|amq_[0-9a-f]{32}"
# A routing-key prefix no account can have (account ids are [a-z0-9-]).
FOREIGN_PREFIX = "~not-an-account"


class BrokerSetupError(RuntimeError):
    pass


@dataclass(frozen=True, kw_only=True)
class AccountPermissions:
    """What one account's broker user may do (regular expressions, as RabbitMQ takes them)."""

    user: str
    configure: str
    write: str
    read: str
    topic: str  # publish and bind, on each shared exchange

    @classmethod
    def of(cls, account: AccountConfig) -> AccountPermissions:
        own = rf"prefsync\.{re.escape(account.id)}\..*"
        exchanges = "|".join(re.escape(e) for e in SHARED_EXCHANGES)
        reach = rf"^({own}|{exchanges}|{LISTENERS})$"
        return cls(user=account.broker.user, configure=rf"^({own}|{LISTENERS})$",
                   write=reach, read=reach, topic=rf"^{re.escape(account.id)}\.")


def vhost_of(url: str) -> str:
    """The virtual host of an AMQP URL (``/`` when the path is empty)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def password_hash(password: str, *, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def isolated_accounts(config: Config) -> list[AccountConfig]:
    return [a for a in config.accounts if a.broker.password is not None]


def definitions(config: Config) -> dict[str, Any]:
    """The users and permissions of every account with a broker password, as a RabbitMQ
    definitions document (users carry password hashes)."""
    vhost = vhost_of(config.broker.url)
    users: list[dict[str, Any]] = []
    permissions: list[dict[str, Any]] = []
    topic_permissions: list[dict[str, Any]] = []
    for account in isolated_accounts(config):
        assert account.broker.password is not None
        granted = AccountPermissions.of(account)
        users.append({"name": granted.user,
                      "password_hash": password_hash(account.broker.password.reveal()),
                      "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []})
        permissions.append({"user": granted.user, "vhost": vhost, "configure": granted.configure,
                            "write": granted.write, "read": granted.read})
        topic_permissions += [{"user": granted.user, "vhost": vhost, "exchange": exchange,
                               "write": granted.topic, "read": granted.topic}
                              for exchange in SHARED_EXCHANGES]
    return {"users": users, "permissions": permissions, "topic_permissions": topic_permissions}


async def _import_definitions(document: dict[str, Any], *, rabbitmqctl: str) -> None:
    try:
        process = await asyncio.create_subprocess_exec(
            rabbitmqctl, "import_definitions", "--format", "json",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
    except OSError as exc:
        raise BrokerSetupError(f"cannot run {rabbitmqctl}: {exc.strerror} (run this on the "
                               "broker's host, or use --print-definitions and the management "
                               "HTTP API)") from None
    output, _ = await process.communicate(orjson.dumps(document))
    if process.returncode != 0:
        raise BrokerSetupError(f"{rabbitmqctl} import_definitions failed "
                               f"({process.returncode}): {output.decode(errors='replace')[-500:]}")


async def _declare(config: Config) -> None:
    topology = Topology(accounts=[a.id for a in config.accounts], shards=config.broker.shards,
                        changes_log_max_age=config.broker.changes_log_max_age)
    connection = await connect(config.broker.url, name="prefsync-broker-setup")
    async with connection:
        await topology.declare(await connection.channel())


async def publish_as(url: str, *, exchange: str, routing_key: str) -> None:
    """Publish one unroutable probe as the URL's user; raises if the broker refuses it."""
    connection = await aio_pika.connect(url, client_properties={
        "connection_name": "prefsync-broker-setup-check"})
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange, ensure=True)
        await target.publish(aio_pika.Message(b"", content_type="application/json"),
                             routing_key=routing_key, mandatory=False)


async def check_isolation(config: Config, account: AccountConfig) -> None:
    """Prove the account's user is confined: own prefix accepted, another prefix refused."""
    url = account_broker_url(config.broker.url, account)
    for exchange in SHARED_EXCHANGES:
        await publish_as(url, exchange=exchange, routing_key=f"{account.id}.setup-check")
        try:
            await publish_as(url, exchange=exchange, routing_key=f"{FOREIGN_PREFIX}.setup-check")
        except aiormq.exceptions.ChannelAccessRefused:
            continue
        raise BrokerSetupError(f"user {account.broker.user!r} could publish outside "
                               f"{account.id}. on {exchange}: topic permissions are not in force")


async def _until_checked(config: Config, account: AccountConfig, timeout_s: float) -> None:
    """The broker applies imported definitions in the background: retry until they hold."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await check_isolation(config, account)
            return
        except (aio_pika.exceptions.AMQPError, BrokerSetupError, OSError) as exc:
            if time.monotonic() > deadline:
                raise BrokerSetupError(f"account {account.id}: {type(exc).__name__}: "
                                       f"{exc}") from None
            await asyncio.sleep(0.5)


async def setup_broker(*, config: Config, rabbitmqctl: str = "rabbitmqctl",
                       print_definitions: bool = False, declare_only: bool = False,
                       timeout_s: float = 60.0, out: TextIO = sys.stdout) -> int:
    """The CLI: returns the exit code. ``declare_only``: the users were applied another way."""
    document = definitions(config)
    if print_definitions:
        out.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if document["users"] and not declare_only:
        await _import_definitions(document, rabbitmqctl=rabbitmqctl)
    await _declare(config)
    for account in config.accounts:
        if account.broker.password is None:
            print(f"{account.id}: no broker password ([accounts.broker] password_env); its "
                  "services connect as the [broker] url user, not confined", file=out)
            continue
        await _until_checked(config, account, timeout_s)
        print(f"{account.id}: user {account.broker.user} confined to {account.id}.* "
              "(checked: another account's routing keys are refused)", file=out)
    print(f"exchanges and queues of {len(config.accounts)} account(s) declared", file=out)
    return 0


