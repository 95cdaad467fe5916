"""A RabbitMQ node and a PostgreSQL cluster of a test's own, on free ports, in a temporary folder.

Fault tests stop, kill and restart these; the machine's own broker (5672) and database (5432)
are never touched. Both need their server binaries (Debian's ``rabbitmq-server`` and
PostgreSQL's ``initdb``/``pg_ctl``); :func:`rabbitmq_available` and :func:`postgres_available`
tell a test whether to skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Protocol, TypeVar

from tests.harness.waiting import until

RABBITMQ_SERVER = "rabbitmq-server"
RABBITMQCTL = "rabbitmqctl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def rabbitmq_available() -> bool:
    return shutil.which(RABBITMQ_SERVER) is not None and shutil.which(RABBITMQCTL) is not None


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).exists():
            return str(root / name)
    return None


def postgres_available() -> bool:
    return _pg_bin("initdb") is not None and _pg_bin("pg_ctl") is not None


def _owner_of_service(user: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def _give(path: Path, user: str) -> None:
    """Hand ``path`` (recursively) to ``user`` when running as root (the servers drop to it)."""
    owner = _owner_of_service(user)
    if os.geteuid() != 0 or owner is None:
        return
    # the service user must be able to reach the folder (temporary folders are 0700)
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)
    for item in [path, *path.rglob("*")]:
        os.chown(item, owner.pw_uid, owner.pw_gid)


async def _run(*argv: str, env: dict[str, str] | None = None, timeout_s: float = 120,
               check: bool = True) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise RuntimeError(f"{argv[0]} {' '.join(argv[1:3])}: no answer in {timeout_s:.0f} s") \
            from None
    text = out.decode(errors="replace")
    if check and process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} exited {process.returncode}: {text[-2000:]}")
    return text


class PrivateRabbitMQ:
    """One RabbitMQ node of its own (``RABBITMQ_NODENAME``, its own ports and folders)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = f"prefsync-{secrets.token_hex(4)}@localhost"
        self.port = free_port()
        dist = free_port()
        while dist == self.port:
            dist = free_port()
        self.dist_port = dist
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self._server: asyncio.subprocess.Process | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.root / "node.pid"),
        })
        return env

    def _prepare(self) -> None:
        for folder in ("mnesia", "log"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            # the default disk alarm (50 MB free) would block publishers on a full test disk
            "disk_free_limit.absolute = 1MB\n")
        (self.root / "enabled_plugins").write_text("[].\n")
        self.root.chmod(0o755)
        _give(self.root, "rabbitmq")

    async def start(self, *, timeout_s: float = 120) -> None:
        """Start the node (a first start prepares its folders) and wait until it serves AMQP."""
        if self._server is None:
            self._prepare()
        self._server = await asyncio.create_subprocess_exec(
            RABBITMQ_SERVER, env=self.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=(self.root / "server.out").open("ab"), stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)
        server = self._server

        def serving() -> bool:
            if _port_open(self.port):
                return True
            if server.returncode is not None:
                log = (self.root / "server.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"RabbitMQ node {self.name} exited: {log}")
            return False

        # the CLI cannot reach the node until its VM has registered with epmd (a port's state
        # has no event to await)
        await until(serving, timeout_s=timeout_s, every=0.1,
                    what=f"RabbitMQ node {self.name} listening on {self.port}")
        await self.ctl("await_startup", timeout_s=timeout_s)

    async def ctl(self, *args: str, timeout_s: float = 60, check: bool = True) -> str:
        return await _run(RABBITMQCTL, "-n", self.name, *args, env=self.env,
                          timeout_s=timeout_s, check=check)

    async def stop(self) -> None:
        """Stop the whole node, as an operator's restart would; ``start`` brings it back."""
        if self._server is None:
            return
        await self.ctl("stop", check=False)
        await self._reap()

    async def kill(self) -> None:
        """SIGKILL the node's Erlang VM (no clean shutdown)."""
        pid_file = self.root / "node.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        await self._reap()

    async def _reap(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        try:
            async with asyncio.timeout(60):
                await server.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            await server.wait()
        await until(lambda: not _port_open(self.port), timeout_s=30,
                    what=f"port {self.port} closed after the node stopped")

    async def stop_app(self) -> None:
        """Stop the broker application, keeping the VM (a quick outage)."""
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        await self.ctl("start_app")
        await self.ctl("await_startup")

    async def close_all_connections(self, reason: str = "chaos") -> None:
        await self.ctl("close_all_connections", reason)

    async def connections(self) -> list[str]:
        """The names of the client connections open now (``connection_name`` properties)."""
        out = await self.ctl("list_connections", "client_properties", "-q", "--no-table-headers")
        return [line for line in out.splitlines() if line.strip()]

    @property
    def running(self) -> bool:
        return self._server is not None


    async def discard(self) -> None:
        """Stop the node for good, whatever state a test left it in."""
        with contextlib.suppress(Exception):
            if self.running:
                await self.stop()
        with contextlib.suppress(Exception):
            await self.kill()


class _Server(Protocol):
    async def start(self) -> None: ...

    async def discard(self) -> None: ...


S = TypeVar("S", bound=_Server)


@asynccontextmanager
async def _running(server: Callable[[Path], S], root: Path | None, name: str) -> AsyncIterator[S]:
    """``server`` in ``root``, started; stopped for good afterwards. Without ``root``, in a
    temporary folder not under pytest's base folder: a concurrent session may reset that one's
    mode to 0700, which locks the server's own user out."""
    with contextlib.ExitStack() as folders:
        if root is None:
            root = Path(folders.enter_context(tempfile.TemporaryDirectory(
                prefix=f"prefsync-{name}-")))
        started = server(root)
        await started.start()
        try:
            yield started
        finally:
            await started.discard()


def private_rabbitmq(root: Path | None = None) -> AbstractAsyncContextManager[PrivateRabbitMQ]:
    """A RabbitMQ node of its own (in ``root``, or a temporary folder), running meanwhile."""
    return _running(PrivateRabbitMQ, root, "rabbitmq")


class PrivatePostgres:
    """One PostgreSQL cluster of its own (``initdb``/``pg_ctl``), trust auth, on a free port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.data = root / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._initialised = False

    def _as_owner(self, *argv: str) -> Sequence[str]:
        if os.geteuid() == 0 and _owner_of_service("postgres") is not None:
            return ("runuser", "-u", "postgres", "--", *argv)
        return argv

    async def start(self) -> None:
        if not self._initialised:
            self.root.mkdir(parents=True, exist_ok=True)
            self.root.chmod(0o755)
            _give(self.root, "postgres")
            initdb = _pg_bin("initdb")
            assert initdb is not None
            await _run(*self._as_owner(initdb, "-D", str(self.data), "-A", "trust",
                                       "-U", "postgres", "--no-sync", "-E", "UTF8"))
            self._initialised = True
        await self._ctl("start", "-w", "-t", "60", "-l", str(self.root / "server.log"), "-o",
                        f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                        "-c fsync=off -c max_connections=200")

    async def _ctl(self, *args: str) -> str:
        pg_ctl = _pg_bin("pg_ctl")
        assert pg_ctl is not None
        return await _run(*self._as_owner(pg_ctl, "-D", str(self.data), *args))

    async def stop(self, *, mode: str = "fast") -> None:
        """``fast`` (a clean shutdown, clients disconnected) or ``immediate`` (as a crash)."""
        await self._ctl("stop", "-w", "-m", mode)


    async def discard(self) -> None:
        """Stop the cluster for good (as a crash: nothing of it is kept)."""
        with contextlib.suppress(Exception):
            await self.stop(mode="immediate")


def private_postgres(root: Path | None = None) -> AbstractAsyncContextManager[PrivatePostgres]:
    """A PostgreSQL cluster of its own (in ``root``, or a temporary folder), running meanwhile."""
    return _running(PrivatePostgres, root, "postgres")
