"""compose.yaml, the Dockerfile and deploy/, checked without a Docker engine.

The compose file is validated against the Compose Specification's JSON schema (shipped here as
compose-spec.json, the copy bundled in the check-jsonschema package on PyPI, Apache-2.0, see
LICENSE.compose-spec) and, where installed, by ``docker-compose config`` (Debian 12's 1.29) and
``docker compose config`` (v2); every image, port, file and command it names is checked; no
password has a default; and the prefsync commands it runs are run here as processes, with their
health checks.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
import yaml

from common.ops.health import healthcheck
from common.ops.metrics import REGISTRY
from services.cli.main import build_parser
from services.runtime.registry import run_services
from tests.harness.waiting import until
from tests.harness.world import delete_queues
from tests.integration.pipeline.conftest import BROKER_URL

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
PREFSYNC_IMAGE = "prefsync:local"
RUN_SERVICES = ("dynamics-poller", "ec-poller", "reconciler", "writer")
METRICS_PORT = 9464
# What the non-prefsync images run as health checks: tools those images ship.
IMAGE_TOOLS = {"rabbitmq": {"rabbitmq-diagnostics"}, "postgres": {"pg_isready"},
               "prom/prometheus": {"wget"}, "grafana/grafana": {"wget"}}
# Ports the upstream images listen on.
IMAGE_PORTS = {"rabbitmq": {5672, 15672, 15692}, "postgres": {5432}, "prom/prometheus": {9090},
               "grafana/grafana": {3000}}
# Every variable compose.yaml needs, each required (``${VAR:?message}``); values for the tests.
REQUIRED_ENV = {"RABBITMQ_PASSWORD": "test-rabbitmq-5f2c", "POSTGRES_PASSWORD": "test-pg-91ab",
                "GRAFANA_ADMIN_PASSWORD": "test-grafana-77de",
                "DEMO_DYNAMICS_SECRET": "test-dynamics-3c1f",
                "DEMO_DOTDIGITAL_PASSWORD": "Test-dotdigital-8"}
# What a user needs on the host (container port -> service), and only on loopback.
PUBLISHED = {"rabbitmq": {5672, 15672}, "grafana": {3000}}
METRICS_PORTS = {METRICS_PORT, 15692, 9090}
_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_REQUIRED = re.compile(r"\$\{([A-Z0-9_]+):\?[^}]*\}")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR:?message}`` with ``env`` (default: the tests' values)."""
    values = REQUIRED_ENV if env is None else env

    def required(match: re.Match[str]) -> str:
        assert values.get(match.group(1)), f"{match.group(1)} is not set"
        return values[match.group(1)]

    return _REQUIRED.sub(required, value)


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    if isinstance(command, str):
        command = shlex.split(command)
    return [interpolate(str(part)) for part in command]


def health_test(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), test
    return [interpolate(str(t)) for t in test[1:]]


def image_repo(image: str) -> str:
    return image.rsplit(":", 1)[0]


def metric_names() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def referenced_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bprefsync_[a-z_]+\b", expr))


def assert_balanced(expr: str) -> None:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in re.sub(r'"[^"]*"', "", expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            assert stack and stack.pop() == pairs[char], expr
    assert not stack, expr


# --- the file itself ------------------------------------------------------------------------
def test_compose_file_follows_the_compose_specification() -> None:
    schema = orjson.loads((Path(__file__).parent / "compose-spec.json").read_bytes())
    validator_class = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_class(schema).iter_errors(compose()), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def compose_config(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in REQUIRED_ENV}
    return subprocess.run([*command, "-f", str(REPO / "compose.yaml"), "config"],
                          env={**clean, **env}, cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def compose_tools() -> list[list[str]]:
    """Installed compose implementations: docker-compose (v1, Debian 12), docker compose (v2)."""
    found = []
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=60,
            check=False).returncode == 0:
        found.append(["docker", "compose"])
    return found


@pytest.mark.parametrize("tool", ["docker-compose", "docker compose"])
def test_compose_accepts_it_and_requires_every_password(tool: str) -> None:
    """``config`` with the variables set resolves the file; without one, it refuses and names
    it (there is no default to fall back on)."""
    command = tool.split()
    if command not in compose_tools():
        pytest.skip(f"{tool} is not installed")
    done = compose_config(command, REQUIRED_ENV)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert set(resolved["services"]) == set(services())
    broker_url = resolved["services"]["writer"]["environment"]["PREFSYNC_BROKER_URL"]
    assert REQUIRED_ENV["RABBITMQ_PASSWORD"] in broker_url
    for variable in REQUIRED_ENV:
        done = compose_config(command, {k: v for k, v in REQUIRED_ENV.items() if k != variable})
        assert done.returncode != 0, variable
        assert f"set {variable}" in done.stderr + done.stdout, (variable, done.stderr)


def test_no_password_has_a_default() -> None:
    text = (REPO / "compose.yaml").read_text()
    used = _VARIABLE.findall(text)
    assert used, "compose.yaml names no variable"
    for variable in used:
        assert re.fullmatch(r"[A-Z0-9_]+:\?set [A-Z0-9_]+", variable), \
            f"${{{variable}}}: every variable is required, with no default"
    assert set(_REQUIRED.findall(text)) == set(REQUIRED_ENV)
    grafana = services()["grafana"]["environment"]
    assert _REQUIRED.fullmatch(grafana["GF_SECURITY_ADMIN_PASSWORD"])
    postgres = services()["postgres"]["environment"]
    assert _REQUIRED.fullmatch(postgres["POSTGRES_PASSWORD"])


def test_broker_users_come_from_the_environment_not_from_committed_hashes() -> None:
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert "password_hash" not in path.read_text(errors="replace"), path
    conf = (DEPLOY / "rabbitmq/rabbitmq.conf").read_text()
    assert not re.search(r"^\s*(load_definitions|default_pass|default_user)\b", conf, re.M)
    assert not re.search(r"^\s*loopback_users", conf, re.M)  # guest stays local-only
    rabbitmq = services()["rabbitmq"]["environment"]
    broker_url = services()["reconciler"]["environment"]["PREFSYNC_BROKER_URL"]
    user, password = re.fullmatch(r"amqp://([^:]+):(\$\{[^}]+\})@rabbitmq:5672/",
                                  broker_url).groups()  # type: ignore[union-attr]
    assert rabbitmq["RABBITMQ_DEFAULT_USER"] == user
    assert rabbitmq["RABBITMQ_DEFAULT_PASS"] == password == "${RABBITMQ_PASSWORD:?set RABBITMQ_PASSWORD}"


def test_only_what_a_user_needs_is_published_and_on_loopback() -> None:
    published: dict[str, set[int]] = {}
    for name, service in services().items():
        for port in service.get("ports", []):
            host, host_port, container_port = str(port).split(":")
            assert host == "127.0.0.1", f"{name}: {port} is published on every interface"
            assert host_port == container_port, (name, port)
            published.setdefault(name, set()).add(int(container_port))
    assert published == PUBLISHED
    assert not set().union(*published.values()) & METRICS_PORTS
    for name in RUN_SERVICES:  # metrics on the container's addresses, for Prometheus
        command = command_of(services()[name])
        assert command[command.index("--metrics-host") + 1] == "0.0.0.0", name


def test_metrics_listen_on_loopback_by_default_outside_containers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFSYNC_METRICS_HOST", raising=False)
    parser = build_parser()
    for args in (["run", "writer", "--metrics-port", "0"], ["up"]):
        assert parser.parse_args(args).metrics_host == "127.0.0.1"
    assert inspect.signature(run_services).parameters["metrics_host"].default == "127.0.0.1"
    monkeypatch.setenv("PREFSYNC_METRICS_HOST", "0.0.0.0")
    assert build_parser().parse_args(["up"]).metrics_host == "0.0.0.0"


def test_every_container_has_a_health_check_and_a_pinned_image() -> None:
    for name, service in services().items():
        assert "healthcheck" in service and not service["healthcheck"].get("disable"), name
        image = service["image"]
        if image == PREFSYNC_IMAGE:
            assert service["build"] == "." and (REPO / "Dockerfile").is_file(), name
        else:
            tag = image.rsplit(":", 1)[-1] if ":" in image else ""
            # at least major.minor: a tag like 16-alpine would float across minor versions
            assert re.match(r"v?\d+\.\d+(\.\d+)?(-[a-z]+)?$", tag), \
                f"{name}: {image} is not pinned to a minor version"
            assert image_repo(image) in IMAGE_TOOLS, f"{name}: unknown image {image}"


def test_every_file_it_mounts_exists_and_every_volume_is_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source} is missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_prefsync_commands_and_health_checks_are_accepted_by_the_cli() -> None:
    parser = build_parser()
    for name, service in services().items():
        if service["image"] == PREFSYNC_IMAGE:
            parser.parse_args(command_of(service))
        check = health_test(service)
        if check[0] == "prefsync":
            args = parser.parse_args(check[1:])
            assert args.command == "healthcheck", name
        else:
            assert check[0] in IMAGE_TOOLS[image_repo(service["image"])], (name, check)


def test_ports_match_what_the_containers_listen_on() -> None:
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    dns = jobs["prefsync"]["dns_sd_configs"][0]
    assert set(dns["names"]) == set(RUN_SERVICES) and dns["port"] == METRICS_PORT
    for name, service in services().items():
        published = {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])}
        assert all(0 < p < 65536 for p in published), name
        command = command_of(service) if service["image"] == PREFSYNC_IMAGE else []
        if name in RUN_SERVICES:
            assert command[:2] == ["run", name], name
            port = int(command[command.index("--metrics-port") + 1])
            assert port == METRICS_PORT and f":{port}/readyz" in health_test(service)[-1], name
            assert not published, f"{name} must scale: no fixed host port"
        elif "--port" in command:  # the simulators: reached over the compose network only
            port = int(command[command.index("--port") + 1])
            assert published <= {port} and f":{port}/" in health_test(service)[-1], name
        elif service["image"] != PREFSYNC_IMAGE:
            assert published <= IMAGE_PORTS[image_repo(service["image"])], name
    rabbit_target = jobs["rabbitmq"]["static_configs"][0]["targets"][0]
    assert int(rabbit_target.rsplit(":", 1)[1]) in IMAGE_PORTS["rabbitmq"]


def test_the_services_config_names_the_compose_hosts() -> None:
    config = tomllib.loads((DEPLOY / "prefsync/prefsync.toml").read_text())
    account = config["accounts"][0]
    assert "sim-dynamics:8081" in account["dynamics"]["url"]
    assert "sim-dotdigital:8082" in account["dotdigital"]["url"]
    assert config["metrics"]["port"] == METRICS_PORT
    seed = command_of(services()["sim-seed"])
    assert seed[seed.index("--account") + 1] == account["id"]


# --- deploy/ --------------------------------------------------------------------------------
def test_alert_rules_are_well_formed_and_use_real_metrics() -> None:
    known = metric_names()
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {"PrefsyncSyncLagging", "PrefsyncDeadLetters",
                                            "PrefsyncErrorRate", "PrefsyncRateLimited"}
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", alert["for"])
        assert_balanced(alert["expr"])
        used = referenced_metrics(alert["expr"])
        assert used and used <= known, used - known
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]
    mounts = " ".join(services()["prometheus"]["volumes"])
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml" in mounts


def test_dashboard_is_provisioned_and_uses_real_metrics() -> None:
    known = metric_names()
    dashboard = orjson.loads((DEPLOY / "grafana/dashboards/prefsync.json").read_bytes())
    assert dashboard["uid"] and dashboard["panels"]
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    shown: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert_balanced(target["expr"])
            shown |= referenced_metrics(target["expr"])
    assert shown <= known, shown - known
    assert {"prefsync_sync_lag_seconds", "prefsync_dead_letter_queue_messages",
            "prefsync_api_throttled_total", "prefsync_writes_total"} <= shown
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/prefsync.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in services()["grafana"]["volumes"]


def test_rabbitmq_plugins() -> None:
    plugins = (DEPLOY / "rabbitmq/enabled_plugins").read_text()
    assert re.fullmatch(r"\[[a-z_,]+\]\.\n", plugins)
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins
    broker_url = services()["reconciler"]["environment"]["PREFSYNC_BROKER_URL"]
    assert interpolate(broker_url).startswith("amqp://prefsync:")


def test_dockerfile_is_slim_non_root_and_pinned() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    for base in re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE):
        assert re.search(r":\d+\.\d+\.\d+-slim", base), base
    user = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.MULTILINE):
        for source in sources.split():
            assert (REPO / source).exists(), source
    assert "--constraint constraints.txt" in dockerfile
    ignored = (REPO / ".dockerignore").read_text()
    assert "deploy/constraints.txt" in ignored


def test_constraints_pin_every_runtime_dependency() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    for requirement in pyproject["project"]["dependencies"]:
        name = re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert pins.get(name), f"{name} is not pinned in deploy/constraints.txt"


# --- the same commands, outside Docker --------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def until_healthy(url: str, process: asyncio.subprocess.Process) -> None:
    async def healthy() -> bool:
        assert process.returncode is None, f"exited with {process.returncode}"
        return await asyncio.to_thread(healthcheck, url, timeout_s=1.0, out=io.StringIO()) == 0

    await until(healthy, timeout_s=60, every=0.1, what=f"{url} healthy")


async def prefsync(*args: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), timeout=300)
    return process.returncode or 0, out.decode()


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_compose_commands_run_outside_docker(tmp_path: Path) -> None:
    spec = services()
    account = f"compose-{secrets.token_hex(3)}"
    ports = {"sim-dynamics": free_port(), "sim-dotdigital": free_port(),
             **{name: free_port() for name in RUN_SERVICES}}
    hosts = {"sim-dynamics:8081": f"127.0.0.1:{ports['sim-dynamics']}",
             "sim-dotdigital:8082": f"127.0.0.1:{ports['sim-dotdigital']}"}

    def local(text: str) -> str:
        for host, here in hosts.items():
            text = text.replace(host, here)
        return text

    def adapt(name: str, args: list[str]) -> list[str]:
        """The container's command, on this machine: its own port, loopback, small data."""
        args = [local(a) for a in args]
        for flag, value in (("--port", ports.get(name)), ("--metrics-port", ports.get(name)),
                            ("--host", "127.0.0.1"), ("--metrics-host", "127.0.0.1"),
                            ("--records", "40"),
                            ("--account", account if name == "sim-seed" else None)):
            if flag in args and value is not None:
                args[args.index(flag) + 1] = str(value)
        return args

    def local_check(name: str) -> str:
        url = local(health_test(spec[name])[-1])
        return re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{ports[name]}", url) \
            if name in ports else url

    config = local((DEPLOY / "prefsync/prefsync.toml").read_text()).replace(
        'id = "demo"', f'id = "{account}"')
    (tmp_path / "prefsync.toml").write_text(config)
    env = {**os.environ, **{k: interpolate(str(v)) for k, v in
                            spec["reconciler"]["environment"].items()},
           "PREFSYNC_CONFIG": str(tmp_path / "prefsync.toml"), "PREFSYNC_BROKER_URL": BROKER_URL,
           "PREFSYNC_STORE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
           "PREFSYNC_METRICS_HOST": "127.0.0.1", "PREFSYNC_LOG_LEVEL": "WARNING"}
    processes: list[asyncio.subprocess.Process] = []

    async def start(name: str) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", *adapt(name, command_of(spec[name])),
            env=env, cwd=REPO, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        processes.append(process)
        await until_healthy(local_check(name), process)
        code, out = await prefsync(*health_test(spec[name])[1:-1], local_check(name), env=env)
        assert code == 0, out

    try:
        await asyncio.gather(start("sim-dynamics"), start("sim-dotdigital"))
        code, out = await prefsync(*adapt("sim-seed", command_of(spec["sim-seed"])), env=env)
        assert code == 0, out
        await asyncio.gather(*(start(name) for name in RUN_SERVICES))
        code, out = await prefsync("sync-now", account, "--wait", "--timeout", "120", env=env)
        assert code == 0 and "finished" in out, out
        code, out = await prefsync("replay", account, "--since", "1h", "--dry-run", env=env)
        assert code == 0 and "would feed" in out, out
        code, out = await prefsync("dlq", "list", "--account", account, env=env)
        assert code == 0 and "0 entries" in out, out
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), timeout=20)
            except TimeoutError:
                process.kill()
                await process.wait()
        await delete_queues(BROKER_URL, account, tomllib.loads(config)["broker"]["shards"])
