"""The one config loader: a TOML file, secrets by env-var (or file) name, env overrides.

Every problem is reported as a :class:`ConfigError` that names the key and what is wrong, so a
bad config stops start-up with one clear line.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ACCOUNT_ID = re.compile(r"^[a-z0-9-]{1,32}$")


class ConfigError(ValueError):
    """A config problem; the message starts with the key's dotted path."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class Secret:
    """A secret string that never shows itself in ``repr``, ``str`` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, kw_only=True)
class VendorCallConfig:
    """How a client calls its vendor, whichever vendor it is (each sets its own defaults)."""

    # The share of the budget left for the customer's other integrations (never spent).
    budget_reserve: float = 0.2
    max_concurrency: int
    timeout_s: float
    # What one call may spend waiting (throttled answers: 429 Retry-After, up to 300 s at
    # Dataverse; X-RateLimit-Reset at dotdigital) and retrying: well inside RabbitMQ's
    # consumer_timeout (30 min), as a handler may make several calls.
    call_deadline_s: float = 360.0


@dataclass(frozen=True, kw_only=True)
class DynamicsConfig(VendorCallConfig):
    url: str
    token_url: str
    client_id: str
    client_secret: Secret
    scope: str
    api_version: str = "v9.2"
    # Dataverse service protection: 6000 requests per 300 s per user; stay inside it.
    requests_per_window: int = 6000
    window_s: float = 300.0
    max_concurrency: int = 16
    page_size: int = 5000
    timeout_s: float = 120.0


@dataclass(frozen=True, kw_only=True)
class DotdigitalConfig(VendorCallConfig):
    url: str
    api_user: str
    password: Secret
    # The lowest documented tier is 35 calls a minute; raise it to the account's own tier.
    calls_per_minute: int = 35
    max_concurrency: int = 4
    # dotdigital asks clients to allow 121 s before treating a call as timed out.
    timeout_s: float = 121.0
    # Each feed read starts this long before the previous read's start, so a change that
    # became visible late (stamped before that read began: a write still committing) is still
    # read. Every read re-reads the changes of this window: at 250 changes a second, 300 s
    # made each run's read 75,000 entries longer.
    feed_overlap_s: float = 30.0
    # How long a v3 import is polled before it is left as unknown (it may still land).
    import_deadline_s: float = 300.0
    # How long the preference tree read in one run is used by the next ones (a preference
    # added in dotdigital is picked up within this long; the daily full read always reads it).
    preference_tree_max_age_s: float = 900.0


@dataclass(frozen=True, kw_only=True)
class AccountBrokerConfig:
    user: str
    password: Secret | None


@dataclass(frozen=True, kw_only=True)
class AccountConfig:
    id: str
    schedule: str = "manual"
    on_email_change: Literal["fresh", "carry"] = "fresh"
    # a change stamped later than this past the moment it is read (on the vendor's measured
    # clock) competes as of when it was read, never on its stamp
    future_tolerance_s: float = 300.0
    dynamics: DynamicsConfig
    dotdigital: DotdigitalConfig
    broker: AccountBrokerConfig
    # ``prefsync api``: the bearer token that opens this account only (None: none of its own)
    api_token: Secret | None = None


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    url: str
    shards: int = 4
    # unacked messages per consumer; a message carries up to 500 changes
    prefetch: int = 32
    # How long the changes log (a stream) keeps messages for replay; RabbitMQ max-age units.
    changes_log_max_age: str = "7D"


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    url: str
    # History rows older than this are pruned (registers and the write ledger never are).
    history_days: int = 400


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    """``prefsync api``: the admin token (every account) and the live lookups' limit."""

    admin_token: Secret | None = None
    # Live Dataverse lookups (a preferences request not answered from the cache) per token.
    lookups_per_minute: int = 30


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    port: int = 9464


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """The reconciler's outstanding-work sweep (services.reconciler.sweep): how often it looks, and how long
    a key's write may be outstanding before its command is published again."""

    interval_s: float = 300.0
    grace_s: float = 120.0


@dataclass(frozen=True, kw_only=True)
class WriterConfig:
    """The writer's write rounds (common.messaging.rounds): how long a round waits, after its
    first batch, for the other shards' batches to join it."""

    linger_ms: int = 250


@dataclass(frozen=True, kw_only=True)
class RunsConfig:
    """The pollers' runs (services.runtime.triggers): one replica at a time holds an account's
    run of each poller under a lease, renewed every third of ``lease_ttl_s``. A replica that
    died (killed, its machine lost) holds it this long; then another, or the same one started
    again, takes the run over from where its checkpoints say."""

    lease_ttl_s: float = 15.0

    @property
    def lease_renew_s(self) -> float:
        return self.lease_ttl_s / 3


@dataclass(frozen=True, kw_only=True)
class Config:
    broker: BrokerConfig
    store: StoreConfig
    accounts: tuple[AccountConfig, ...]
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    writer: WriterConfig = field(default_factory=WriterConfig)
    runs: RunsConfig = field(default_factory=RunsConfig)
    source: str = "<memory>"

    def account(self, account_id: str) -> AccountConfig:
        for account in self.accounts:
            if account.id == account_id:
                return account
        raise ConfigError("accounts", f"no account with id {account_id!r}")


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("PREFSYNC_CONFIG") or "prefsync.toml")


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Read, validate and resolve the config file (``$PREFSYNC_CONFIG``, then ./prefsync.toml)."""
    env = os.environ if env is None else env
    file = Path(path) if path is not None else default_config_path(env)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("--config", f"file {str(file)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{file} is not valid TOML: {exc}") from None
    return parse_config(raw, env=env, source=str(file))


def parse_config(raw: Mapping[str, Any], *, env: Mapping[str, str], source: str = "<memory>") -> Config:
    reader = _Reader(raw, "", env)
    broker = reader.table("broker")
    broker_url = env.get("PREFSYNC_BROKER_URL") or broker.text("url")
    store = reader.table("store")
    store_url = env.get("PREFSYNC_STORE_URL") or store.text("url")
    if not re.match(r"^(sqlite|postgres(ql)?)://", store_url):
        raise ConfigError("store.url", f"unsupported scheme in {store_url!r} (sqlite:// or postgresql://)")
    metrics = reader.optional_table("metrics")
    sweep = reader.optional_table("sweep")
    writer = reader.optional_table("writer")
    runs = reader.optional_table("runs")
    accounts = tuple(_account(a, env) for a in reader.tables("accounts"))
    if not accounts:
        raise ConfigError("accounts", "at least one [[accounts]] entry is required")
    seen: set[str] = set()
    for i, account in enumerate(accounts):
        if account.id in seen:
            raise ConfigError(f"accounts[{i}].id", f"duplicate account id {account.id!r}")
        seen.add(account.id)
    api = _api(reader.optional_table("api"), accounts)
    return Config(
        broker=BrokerConfig(
            url=broker_url,
            shards=broker.integer("shards", default=4, minimum=1, maximum=256),
            prefetch=broker.integer("prefetch", default=32, minimum=1, maximum=65535),
            changes_log_max_age=_max_age(broker),
        ),
        store=StoreConfig(url=store_url, history_days=store.integer(
            "history_days", default=400, minimum=1, maximum=36_500)),
        accounts=accounts,
        metrics=MetricsConfig(
            port=metrics.integer("port", default=9464, minimum=0, maximum=65535) if metrics else 9464
        ),
        api=api,
        sweep=SweepConfig(
            interval_s=sweep.number("interval_s", default=300.0, minimum=0.1),
            grace_s=sweep.number("grace_s", default=120.0, minimum=0.0),
        ) if sweep else SweepConfig(),
        writer=WriterConfig(
            linger_ms=writer.integer("linger_ms", default=250, minimum=0, maximum=5000),
        ) if writer else WriterConfig(),
        runs=RunsConfig(
            lease_ttl_s=runs.number("lease_ttl_s", default=RunsConfig.lease_ttl_s, minimum=1.0),
        ) if runs else RunsConfig(),
        source=source,
    )


def _api(reader: _Reader | None, accounts: tuple[AccountConfig, ...]) -> ApiConfig:
    admin = reader.secret("admin_token", required=False) if reader else None
    # One token, one caller: a token shared by two accounts (or with the admin) would open
    # whichever is checked first.
    holders: dict[Secret, str] = {} if admin is None else {admin: "api.admin_token"}
    for i, account in enumerate(accounts):
        if account.api_token is None:
            continue
        key = f"accounts[{i}].api.token"
        if account.api_token in holders:
            raise ConfigError(key, f"the same token as {holders[account.api_token]}; "
                                   "give each account (and the admin) a token of its own")
        holders[account.api_token] = key
    return ApiConfig(
        admin_token=admin,
        lookups_per_minute=reader.integer("lookups_per_minute", default=30, minimum=1,
                                          maximum=6000) if reader else 30)


def _max_age(broker: _Reader) -> str:
    value = broker.text("changes_log_max_age", default="7D")
    if not re.match(r"^[1-9][0-9]*[YMDhms]$", value):
        raise ConfigError(broker.key("changes_log_max_age"),
                          f"{value!r} must look like 7D, 12h or 30m (units Y M D h m s)")
    return value


def _account(reader: _Reader, env: Mapping[str, str]) -> AccountConfig:
    account_id = reader.text("id")
    if not ACCOUNT_ID.match(account_id):
        raise ConfigError(reader.key("id"), f"{account_id!r} must match [a-z0-9-]{{1,32}}")
    schedule = reader.text("schedule", default="manual")
    from common.schedule import parse_schedule  # local import: schedule imports nothing of ours

    try:
        parse_schedule(schedule)
    except ValueError as exc:
        raise ConfigError(reader.key("schedule"), str(exc)) from None
    on_change = reader.text("on_email_change", default="fresh")
    if on_change not in ("fresh", "carry"):
        raise ConfigError(reader.key("on_email_change"), f"{on_change!r} must be 'fresh' or 'carry'")
    dyn = reader.table("dynamics")
    dyn_url = dyn.text("url").rstrip("/")
    dd = reader.table("dotdigital")
    broker = reader.optional_table("broker")
    api = reader.optional_table("api")
    return AccountConfig(
        id=account_id,
        schedule=schedule,
        on_email_change="carry" if on_change == "carry" else "fresh",
        future_tolerance_s=reader.number("future_tolerance_s", default=300.0, minimum=0.0),
        dynamics=DynamicsConfig(
            url=dyn_url,
            token_url=dyn.text("token_url"),
            client_id=dyn.text("client_id"),
            client_secret=dyn.secret("client_secret"),
            scope=dyn.text("scope", default=f"{dyn_url}/.default"),
            api_version=dyn.text("api_version", default="v9.2"),
            requests_per_window=dyn.integer("requests_per_window", default=6000, minimum=1),
            window_s=dyn.number("window_s", default=300.0, minimum=1.0),
            page_size=dyn.integer("page_size", default=5000, minimum=1, maximum=5000),
            **_vendor_calls(dyn, budget_key="requests_per_window", default_budget=6000,
                            max_concurrency=16, concurrency_limit=52, timeout_s=120.0),
        ),
        dotdigital=DotdigitalConfig(
            url=dd.text("url").rstrip("/"),
            api_user=dd.text("api_user"),
            password=dd.secret("password"),
            calls_per_minute=dd.integer("calls_per_minute", default=35, minimum=1),
            feed_overlap_s=dd.number("feed_overlap_s", default=30.0, minimum=0.0),
            **_vendor_calls(dd, budget_key="calls_per_minute", default_budget=35,
                            max_concurrency=4, timeout_s=121.0),
            import_deadline_s=dd.number("import_deadline_s", default=300.0, minimum=0.1),
            preference_tree_max_age_s=dd.number("preference_tree_max_age_s", default=900.0,
                                                minimum=0.0),
        ),
        broker=AccountBrokerConfig(
            user=(broker.text("user", default=f"prefsync-{account_id}") if broker
                  else f"prefsync-{account_id}"),
            password=broker.secret("password", required=False) if broker else None,
        ),
        api_token=api.secret("token", required=False) if api else None,
    )


def _vendor_calls(vendor: _Reader, *, budget_key: str, default_budget: int, max_concurrency: int,
                  concurrency_limit: int | None = None, timeout_s: float) -> dict[str, Any]:
    """The :class:`VendorCallConfig` settings of a vendor's table, with its defaults."""
    return {
        "budget_reserve": _reserve(vendor, budget_key, default_budget),
        "max_concurrency": vendor.integer("max_concurrency", default=max_concurrency, minimum=1,
                                          maximum=concurrency_limit),
        "timeout_s": vendor.number("timeout_s", default=timeout_s, minimum=1.0),
        "call_deadline_s": vendor.number("call_deadline_s", default=360.0, minimum=0.1),
    }


def _reserve(vendor: _Reader, budget_key: str, default_budget: int) -> float:
    """``budget_reserve``: a fraction of the budget in [0, 1) that leaves at least one call."""
    reserve = vendor.number("budget_reserve", default=0.2, minimum=0.0)
    if reserve >= 1.0:
        raise ConfigError(vendor.key("budget_reserve"),
                          f"must be below 1 (a fraction of the budget), got {reserve}")
    budget = vendor.integer(budget_key, default=default_budget, minimum=1)
    if budget * (1.0 - reserve) + 1e-9 < 1.0:
        raise ConfigError(vendor.key("budget_reserve"),
                          f"{reserve} of {budget_key} = {budget} leaves no call to spend")
    return reserve


class _Reader:
    """Typed access to one TOML table that knows its own dotted path for error messages."""

    def __init__(self, data: Mapping[str, Any], path: str, env: Mapping[str, str]) -> None:
        self._data = data
        self._path = path
        self._env = env

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def _get(self, name: str, default: Any) -> Any:
        if name in self._data:
            return self._data[name]
        if default is _REQUIRED:
            raise ConfigError(self.key(name), "is required")
        return default

    def text(self, name: str, *, default: Any = None) -> str:
        value = self._get(name, _REQUIRED if default is None else default)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(self.key(name), f"must be a non-empty string, got {value!r}")
        return value.strip()

    def integer(self, name: str, *, default: int, minimum: int | None = None,
            maximum: int | None = None) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(self.key(name), f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(self.key(name), f"must be at most {maximum}, got {value}")
        return value

    def number(self, name: str, *, default: float, minimum: float | None = None) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.key(name), f"must be a number, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(self.key(name), f"must be at least {minimum}, got {value}")
        return float(value)

    def secret(self, name: str, *, required: bool = True) -> Secret | Any:
        """``<name>_env`` names an environment variable, ``<name>_file`` a file; never inline."""
        if name in self._data:
            raise ConfigError(self.key(name), f"secrets are not read from the file; "
                                              f"set {name}_env (an env-var name) or {name}_file")
        env_key, file_key = f"{name}_env", f"{name}_file"
        if env_key in self._data:
            var = self.text(env_key)
            value = self._env.get(var)
            if not value:
                raise ConfigError(self.key(env_key), f"environment variable {var} is not set")
            return Secret(value)
        if file_key in self._data:
            path = Path(self.text(file_key))
            try:
                return Secret(path.read_text(encoding="utf-8").strip())
            except OSError as exc:
                raise ConfigError(self.key(file_key), f"cannot read {path}: {exc.strerror}") from None
        if required:
            raise ConfigError(self.key(env_key), "is required (or " + file_key + ")")
        return None

    def table(self, name: str) -> _Reader:
        value = self._get(name, _REQUIRED)
        if not isinstance(value, Mapping):
            raise ConfigError(self.key(name), "must be a table")
        return _Reader(value, self.key(name), self._env)

    def optional_table(self, name: str) -> _Reader | None:
        return self.table(name) if name in self._data else None

    def tables(self, name: str) -> list[_Reader]:
        value = self._get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise ConfigError(self.key(name), "must be an array of tables ([[" + name + "]])")
        return [_Reader(v, f"{self.key(name)}[{i}]", self._env) for i, v in enumerate(value)]


_REQUIRED: Any = object()
