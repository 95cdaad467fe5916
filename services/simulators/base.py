"""What both vendor simulators share: the clock, fault injection, call counters and ``/_sim/``.

The ``/_sim/`` routes are a test-control surface of the simulators only; they are not part of
either vendor's API and take no authentication. Tests, the demo and benchmarks drive them.

``PUT /_sim/journal {"enabled": true}`` starts (and empties) a journal of every preference
write, each with the email, the dotdigital preference id, the value, the vendor's stamp, the
real time (``real_at``: the machine's clock, where the simulator's own may be shifted),
``via`` (``api``: through the vendor's API; ``sim``: a ``/_sim/`` edit acting as a user) and,
for a write through the API, ``answered``: whether the caller was still there to receive the
answer (false when it gave up first, as a client that timed out does, or the answer was lost
by a fault); ``GET /_sim/journal`` reads it.

Each simulator's settings (``faults``, ``clock``, and its own ``limits``) are read with
``GET /_sim/<name>`` and set with ``PUT``; ``POST /_sim/save`` writes the state file now (400
when none was configured). The chaos suite counts writes per key with it, and tells who
wrote what a side holds. Off by default (a benchmark's millions of writes are not kept).
"""

from __future__ import annotations

import asyncio
import contextvars
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, Protocol

import orjson
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# Against these simulators, two changes on different sides tie when their spans in prefsync's
# time base overlap: each is its vendor stamp less the measured offset, widened by that
# offset's uncertainty (at most half a second: the simulators' Date headers are whole seconds),
# and a Dataverse stamp is a whole second wide. Changes more than 1 + 2 * (0.5 + 0.5) s apart
# never tie: a story (the demo, a test of something else) that wants a change surely later
# than the writes of a sync makes it this long after the sync.
TIE_RANGE_S = 3.2


class RequestNote:
    """Whether an API request's caller received its answer, for the journal entries of the
    writes it made: those made while it is handled, and those made later on its behalf (an
    accepted import, applied after its answer: a timer keeps the request's context)."""

    def __init__(self) -> None:
        self.answered: bool | None = None
        self._entries: list[dict[str, Any]] = []

    def journaled(self, entry: dict[str, Any]) -> None:
        if self.answered is None:
            self._entries.append(entry)
        else:
            entry["answered"] = self.answered

    def answer(self, answered: bool) -> None:
        self.answered = answered
        for entry in self._entries:
            entry["answered"] = answered
        self._entries.clear()


# The API request being handled (set by the middleware, in the request's own task context).
_REQUEST: contextvars.ContextVar[RequestNote | None] = contextvars.ContextVar(
    "sim_request", default=None)


class SimClock:
    """The simulator's own clock: real UTC time, optionally shifted or frozen by tests."""

    def __init__(self) -> None:
        self._offset = timedelta(0)
        self._frozen: datetime | None = None

    def now(self) -> datetime:
        if self._frozen is not None:
            return self._frozen
        return datetime.now(UTC) + self._offset

    @property
    def is_system_time(self) -> bool:
        """Neither frozen nor shifted: :meth:`now` is the system time in UTC."""
        return self._frozen is None and not self._offset

    def set(self, *, offset_s: float | None = None, freeze_at: datetime | None = None) -> None:
        self._offset = timedelta(seconds=offset_s or 0.0)
        self._frozen = freeze_at.astimezone(UTC) if freeze_at is not None else None

    def describe(self) -> dict[str, Any]:
        return {
            "now": self.now().isoformat().replace("+00:00", "Z"),
            "offset_s": self._offset.total_seconds(),
            "frozen": self._frozen is not None,
        }


class ErrorResponder(Protocol):
    """Builds a response in the vendor's own error shape."""

    def server_error(self) -> web.Response: ...

    def throttled(self, *, retry_after_s: int, limit: int, remaining: int) -> web.Response: ...


@dataclass
class Faults:
    """Injected latency, random server errors, an extra throttle and lost answers (the request
    is applied, then its connection drops before the answer), matched by path prefix.

    Keys look like ``"PATCH /api/data/v9.2/psync_"``: a method, a space and a path prefix;
    ``"* /prefix"`` matches any method.
    """

    latency_ms: dict[str, float] = field(default_factory=dict)
    error_rate: dict[str, float] = field(default_factory=dict)
    throttle_limit: int | None = None
    throttle_window_s: float = 60.0
    # how many of the next answers to lose, per key
    lost_answers: dict[str, int] = field(default_factory=dict)
    _throttle_hits: list[float] = field(default_factory=list)

    @staticmethod
    def _match(table: Mapping[str, float], method: str, path: str) -> float:
        best_len, best = -1, 0.0
        for key, value in table.items():
            m, _, prefix = key.partition(" ")
            if (m == "*" or m.upper() == method) and path.startswith(prefix) and len(prefix) > best_len:
                best_len, best = len(prefix), value
        return best

    def latency_for(self, method: str, path: str) -> float:
        return self._match(self.latency_ms, method, path) / 1000.0

    def error_for(self, method: str, path: str) -> float:
        return self._match(self.error_rate, method, path)

    def lose_answer(self, method: str, path: str) -> bool:
        """Whether this request's answer is lost (one of the next ``lost_answers``)."""
        best_len, best = -1, ""
        for key, left in self.lost_answers.items():
            m, _, prefix = key.partition(" ")
            if (left > 0 and (m == "*" or m.upper() == method) and path.startswith(prefix)
                    and len(prefix) > best_len):
                best_len, best = len(prefix), key
        if not best:
            return False
        self.lost_answers[best] -= 1
        return True

    def throttle_check(self, now: float) -> tuple[bool, int, int]:
        """Returns (allowed, remaining, seconds until a slot frees)."""
        if self.throttle_limit is None:
            return True, 0, 0
        cutoff = now - self.throttle_window_s
        hits = self._throttle_hits
        while hits and hits[0] <= cutoff:
            hits.pop(0)
        if len(hits) >= self.throttle_limit:
            wait = max(1, int(hits[0] + self.throttle_window_s - now + 0.999))
            return False, 0, wait
        hits.append(now)
        return True, self.throttle_limit - len(hits), 0

    def load(self, body: Mapping[str, Any]) -> None:
        self.latency_ms = {str(k): float(v) for k, v in (body.get("latency_ms") or {}).items()}
        self.error_rate = {str(k): float(v) for k, v in (body.get("error_rate") or {}).items()}
        self.lost_answers = {str(k): int(v) for k, v in (body.get("lost_answers") or {}).items()}
        throttle = body.get("throttle")
        if throttle:
            self.throttle_limit = int(throttle["limit"])
            self.throttle_window_s = float(throttle.get("window_s", 60))
        else:
            self.throttle_limit = None
        self._throttle_hits.clear()

    def clear(self) -> None:
        self.load({})

    def describe(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency_ms,
            "error_rate": self.error_rate,
            "lost_answers": self.lost_answers,
            "throttle": (
                {"limit": self.throttle_limit, "window_s": self.throttle_window_s}
                if self.throttle_limit is not None
                else None
            ),
        }


@dataclass
class Stats:
    """Call counters per ``"<METHOD> <route>"`` and per status, plus writes applied.

    Operations inside a batch request are counted under their own routes in ``calls`` and
    also in ``in_batches``, so the HTTP requests made are ``calls`` less ``in_batches``.
    """

    calls: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    writes_applied: int = 0
    in_batches: Counter[str] = field(default_factory=Counter)
    # set whenever a call is counted: what runs in the simulator's process (a test) awaits
    # the calls it expects instead of polling /_sim/stats
    counted: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    def count(self, call: str, times: int = 1) -> None:
        self.calls[call] += times
        self.counted.set()

    async def until(self, condition: Callable[[Mapping[str, int]], bool]) -> None:
        """Until ``condition`` holds of the call counts, looked at after each call counted."""
        while not condition(self.calls):
            self.counted.clear()
            await self.counted.wait()

    def clear(self) -> None:
        self.calls.clear()
        self.statuses.clear()
        self.writes_applied = 0
        self.in_batches.clear()

    def describe(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "statuses": dict(self.statuses),
            "total_calls": sum(self.calls.values()),
            "writes_applied": self.writes_applied,
            "in_batches": dict(self.in_batches),
        }


def json_response(body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None,
                  content_type: str = "application/json") -> web.Response:
    return json_body_response(orjson.dumps(body), status=status, headers=headers,
                              content_type=content_type)


def json_body_response(body: bytes, *, status: int = 200,
                       headers: Mapping[str, str] | None = None,
                       content_type: str = "application/json") -> web.Response:
    """An answer of JSON already rendered (``orjson``'s bytes)."""
    return web.Response(body=body, status=status, headers=headers,
                        content_type=content_type.split(";")[0], charset=None)


def parse_time(value: str) -> datetime:
    """ISO-8601 with ``Z``, an offset, or a bare date; naive values are UTC."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


async def json_object(request: web.Request) -> dict[str, Any]:
    """A ``/_sim/`` request's body: a JSON object (an empty body is ``{}``); anything else is a
    ValueError that says what it is instead."""
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


@dataclass(frozen=True, kw_only=True)
class Setting:
    """Simulator state a test reads (``GET /_sim/<name>``), sets (``PUT``, a JSON object) and,
    where ``clear`` is given, clears (``DELETE``). Each answer describes it as it then is; a
    body it cannot load is a 400 that says why."""

    name: str
    describe: Callable[[], Any]
    load: Callable[[dict[str, Any]], None]
    clear: Callable[[], None] | None = None

    def install(self, app: web.Application) -> None:
        path = f"/_sim/{self.name}"
        app.router.add_put(path, self._put)
        app.router.add_get(path, self._get)
        if self.clear is not None:
            app.router.add_delete(path, self._delete)

    async def _get(self, request: web.Request) -> web.Response:
        return json_response(self.describe())

    async def _put(self, request: web.Request) -> web.Response:
        try:
            self.load(await json_object(request))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return json_response({"error": f"bad {self.name}: {exc}"}, status=400)
        return json_response(self.describe())

    async def _delete(self, request: web.Request) -> web.Response:
        if self.clear is not None:
            self.clear()
        return json_response(self.describe())


class SimControl:
    """The state every simulator has, and the ``/_sim/`` routes and middleware over it."""

    def __init__(
        self,
        *,
        errors: ErrorResponder,
        reset: Callable[[], None],
        seed: Callable[[Mapping[str, Any]], Any],
        save: Callable[[], object | None],
        api_prefixes: tuple[str, ...],
    ) -> None:
        self.clock = SimClock()
        self.faults = Faults()
        self.stats = Stats()
        self._errors = errors
        self._reset = reset
        self._seed = seed
        self._save = save
        self._api_prefixes = api_prefixes
        self._rng = random.Random()
        # preference writes, while the journal is enabled (see the module docstring)
        self.journal: list[dict[str, Any]] | None = None

    def note_write(self, entry: dict[str, Any]) -> None:
        """Journal one preference write (a no-op unless the journal is enabled), with the real
        time it was made at (``real_at``: the machine's clock, whatever the simulator's own
        reads); a write through the API is told ``answered`` when its request ends."""
        if self.journal is not None:
            entry["real_at"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            self.journal.append(entry)
            if (request := _REQUEST.get()) is not None:
                request.journaled(entry)

    def install(self, app: web.Application, *settings: Setting) -> None:
        """The shared ``/_sim/`` routes, and the simulator's own ``settings``."""
        app.middlewares.append(self._middleware)
        app.router.add_post("/_sim/reset", self._handle_reset)
        app.router.add_post("/_sim/seed", self._handle_seed)
        app.router.add_post("/_sim/save", self._handle_save)
        shared = (Setting(name="faults", describe=self.faults.describe, load=self.faults.load,
                          clear=self.faults.clear),
                  Setting(name="clock", describe=self.clock.describe, load=self._set_clock))
        for setting in (*shared, *settings):
            setting.install(app)
        app.router.add_get("/_sim/stats", self._handle_stats)
        app.router.add_put("/_sim/journal", self._handle_put_journal)
        app.router.add_get("/_sim/journal", self._handle_get_journal)

    def is_api(self, path: str) -> bool:
        return any(path.startswith(p) for p in self._api_prefixes)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if not self.is_api(path):
            return await handler(request)
        method = request.method
        route = self._route_name(request)
        self.stats.count(f"{method} {route}")
        # only while the journal is kept: a benchmark's millions of requests pay nothing
        note = RequestNote() if self.journal is not None else None
        _REQUEST.set(note)
        delay = self.faults.latency_for(method, path)
        if delay > 0:
            # the request is received whole first, as a server reads it before it works on it:
            # a caller that gives up meanwhile does not stop it (its write lands all the same)
            await request.read()
            await asyncio.sleep(delay)
        allowed, remaining, wait = self.faults.throttle_check(asyncio.get_running_loop().time())
        if not allowed:
            response: web.StreamResponse = self._errors.throttled(
                retry_after_s=wait, limit=self.faults.throttle_limit or 0, remaining=remaining)
        elif (rate := self.faults.error_for(method, path)) > 0 and self._rng.random() < rate:
            response = self._errors.server_error()
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = exc
            if self.faults.lose_answer(method, path) and request.transport is not None:
                # applied, and the connection drops before the answer: the client cannot
                # tell whether it was
                request.transport.abort()
            if note is not None:
                # a caller that gave up (its connection closed) never learns what this did
                note.answer(request.transport is not None
                            and not request.transport.is_closing())
        self.stats.statuses[str(response.status)] += 1
        if not response.prepared:
            # stamped by the simulator's clock, as a vendor's answers are by its own
            response.headers["Date"] = format_datetime(self.clock.now(), usegmt=True)
        return response

    @staticmethod
    def _route_name(request: web.Request) -> str:
        info = request.match_info.route.resource
        if info is not None:
            canonical = info.canonical
            if canonical:
                return canonical
        return request.path

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self._reset()
        self.faults.clear()
        self.stats.clear()
        self.clock.set()
        return json_response({"reset": True})

    async def _handle_seed(self, request: web.Request) -> web.Response:
        try:
            made = self._seed(await json_object(request))
        except (ValueError, KeyError, TypeError) as exc:
            return json_response({"error": f"bad seed request: {exc}"}, status=400)
        return json_response(made)

    async def _handle_save(self, request: web.Request) -> web.Response:
        saved = self._save()
        if saved is None:
            return json_response({"error": "the simulator was started without a state file"},
                                 status=400)
        return json_response({"saved": str(saved)})

    def _set_clock(self, body: Mapping[str, Any]) -> None:
        freeze = body.get("freeze_at")
        self.clock.set(
            offset_s=float(body["offset_s"]) if "offset_s" in body else None,
            freeze_at=parse_time(freeze) if freeze else None,
        )

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return json_response(self.stats.describe())

    async def _handle_put_journal(self, request: web.Request) -> web.Response:
        try:
            enabled = bool((await json_object(request)).get("enabled", True))
        except ValueError as exc:
            return json_response({"error": f"bad journal request: {exc}"}, status=400)
        self.journal = [] if enabled else None
        return json_response({"enabled": enabled})

    async def _handle_get_journal(self, request: web.Request) -> web.Response:
        return json_response({"enabled": self.journal is not None,
                              "entries": self.journal or []})


@asynccontextmanager
async def serving(app: web.Application, *, host: str = "127.0.0.1",
                  port: int = 0) -> AsyncIterator[str]:
    """Serve ``app`` for the duration of the block (port 0: any free port); yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = getattr(site._server, "sockets", None)
    bound = sockets[0].getsockname()[1] if sockets else port
    try:
        yield f"http://{host}:{bound}"
    finally:
        await runner.cleanup()


async def serve(app: web.Application, *, host: str, port: int,
                ready: Callable[[int], None] | None = None) -> None:
    """Serve ``app`` until cancelled; ``ready`` gets the bound port (useful with port 0)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    sockets = getattr(site._server, "sockets", None)
    if sockets:
        bound = sockets[0].getsockname()[1]
    if ready is not None:
        ready(bound)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
