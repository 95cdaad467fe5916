"""The aiohttp application: token endpoint, Web API routes, auth and limits, ``/_sim/`` extras.

Sim-only routes besides the shared ``/_sim/`` ones (reset, seed, faults, clock, stats;
reset clears the data and limit usage, while configured limits and issued tokens stay):

- ``GET|PUT /_sim/limits`` — service protection limits, fields as :class:`ServiceLimits`
  (``requests``, ``execution_time_ms``, ``window_s``, ``concurrent``); PUT changes only the
  fields given and clears usage so far.
- ``POST /_sim/save`` — write the state file now (400 when none was configured).
- ``GET /_sim/dynamics/tables`` — row and tombstone counts per table, the current version.
- ``POST /_sim/dynamics/edit`` — change data as a user in the Dynamics UI would (rules apply,
  versions and ``modifiedon`` move):
  ``{"email": E, "preference_id": <dotdigital id>, "status": "opted_in"|"opted_out"|null,
  "account": "demo"}`` sets (or with null deletes) the subscription of the record with that
  e-mail (the answer gives the row's ``versionnumber`` and ``modifiedon``, and the record);
  ``{"email": E, "set": {"donotbulkemail": true, "statecode": 1, ...}}`` updates the record
  itself. The record is looked up in contacts, then leads, then accounts.
- ``POST /_sim/dynamics/edits`` — ``{"edits": [<an edit's body>, ...]}``: several users' edits
  in one request, applied in order; ``results`` holds each one's answer, or its error (and the
  status ``/edit`` would answer) where it was refused, the others applied all the same.
"""

from __future__ import annotations

import asyncio
import random
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from ..base import Setting, SimControl, json_object, json_response
from .api import Api
from .auth import Authority, Client, TokenError, demo_client, parse_clients
from .batch import Batch
from .limits import Limiter, ServiceLimits
from .protocol import (
    REQUESTS_LIMIT,
    UNEXPECTED,
    ApiError,
    Result,
    json_result,
    make_call,
)
from .routes import VERSIONS, templates
from .schema import OPTED_IN, OPTED_OUT, SUBSCRIPTIONS, TABLES, TableSchema
from .seed import seed_store
from .state import load_file, save_file
from .store import Row, Store
from .writes import Writes

_API_PATH = re.compile(r"^/api/data/(v9\.[0-2])(?:/(.*))?$")
CLIENT_ID = web.RequestKey("client_id", str)


def to_response(result: Result) -> web.Response:
    return web.Response(status=result.status, body=result.body or None, headers=result.headers)


class _Errors:
    """Dataverse-shaped answers for the shared fault middleware."""

    def __init__(self, control: SimControl | None = None) -> None:
        self.control = control

    def server_error(self) -> web.Response:
        return to_response(self.server_error_result())

    def server_error_result(self) -> Result:
        return json_result({"error": {"code": UNEXPECTED, "message": "An unexpected error "
                                      "occurred."}}, status=500)

    def throttled(self, *, retry_after_s: int, limit: int, remaining: int) -> web.Response:
        window = self.control.faults.throttle_window_s if self.control else 300
        message = (f"Number of requests exceeded the limit of {limit} over time window of "
                   f"{int(window)} seconds.")
        return to_response(json_result(
            {"error": {"code": REQUESTS_LIMIT, "message": message}}, status=429,
            headers={"Retry-After": str(retry_after_s),
                     "x-ms-ratelimit-burst-remaining-xrm-requests": str(remaining)}))


class DynamicsApp:
    """Everything one simulated organisation holds, and its aiohttp application."""

    def __init__(self, *, clients: list[Client], state_file: Path | None, retention: timedelta,
                 token_lifetime_s: int, limits: ServiceLimits) -> None:
        self.errors = _Errors()
        self.control = SimControl(errors=self.errors, reset=self.reset, seed=self.seed,
                                  save=self._saved, api_prefixes=("/api/data/",))
        self.errors.control = self.control
        self.clock = self.control.clock
        self.store = Store()
        self.state_file = state_file
        self.authority = Authority(clients=clients, lifetime_s=token_lifetime_s,
                                   now=self.clock.now)
        self.limiter = Limiter(limits)
        self.writes = Writes(self.store, self.clock.now, on_write=self._count_write,
                             clock=self.clock)
        self.writes.on_row = self._journal_row
        self._editing = False  # inside a /_sim/dynamics/edit (a user's change, not the API's)
        self.api = Api(store=self.store, writes=self.writes, now=self.clock.now,
                       retention=retention)
        self.batch = Batch(api=self.api, record=self._record_in_batch, fault=self._fault,
                           faulting=self._faulting)
        self._rng = random.Random()
        if state_file is not None:
            load_file(self.store, state_file)
        self.app = self._build()

    # -- wiring ----------------------------------------------------------------------------------

    def _build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.middlewares.append(self._guard)  # outermost: auth and limits see injected latency
        self.control.install(app, Setting(name="limits", describe=self._describe_limits,
                                          load=self._load_limits))
        app.router.add_get("/_sim/dynamics/tables", self._tables)
        app.router.add_post("/_sim/dynamics/edit", self._edit)
        app.router.add_post("/_sim/dynamics/edits", self._edits)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        for version in VERSIONS:
            app.router.add_route("*", f"/api/data/{version}", self._handle)
            for pattern, _ in templates(version):
                app.router.add_route("*", pattern, self._handle)
        return app

    def reset(self) -> None:
        self.store.clear()
        self.limiter.reset()

    def seed(self, body: Any) -> dict[str, Any]:
        return seed_store(self.store, dict(body), now=self.clock.now())

    def save(self) -> bool:
        if self.state_file is None:
            return False
        save_file(self.store, self.state_file)
        return True

    def _count_write(self) -> None:
        self.control.stats.writes_applied += 1

    def _journal_row(self, schema: TableSchema, row: Row) -> None:
        """Journal a subscription row written (``/_sim/journal``), under its record's email."""
        if self.control.journal is None or schema is not SUBSCRIPTIONS:
            return
        record = None
        for lookup, entity_set in (("_psync_contactid_value", "contacts"),
                                   ("_psync_leadid_value", "leads"),
                                   ("_psync_accountid_value", "accounts")):
            if row.get(lookup):
                record = (entity_set, str(row[lookup]))
                break
        preference = self.store.tables["psync_marketingpreferences"].rows.get(
            str(row.get("_psync_preferenceid_value")))
        if record is None or preference is None:
            return
        owner = self.store.tables[record[0]].rows.get(record[1]) or {}
        modified = row["modifiedon"]
        self.control.note_write({
            "account": preference.get("psync_ecaccount"), "email": owner.get("emailaddress1"),
            "record_id": record[1], "preference_id": preference.get("psync_ecpreferenceid"),
            "opted_in": row.get("psync_status") == OPTED_IN,
            "at": modified.isoformat().replace("+00:00", "Z"),
            "version": row["versionnumber"], "via": "sim" if self._editing else "api"})

    def _record(self, method: str, route: str, status: int) -> None:
        self.control.stats.count(f"{method} {route}")
        self.control.stats.statuses[str(status)] += 1

    def _record_in_batch(self, method: str, route: str, status: int, times: int) -> None:
        stats = self.control.stats
        call = f"{method} {route}"
        stats.count(call, times)
        stats.statuses[str(status)] += times
        stats.in_batches[call] += times

    def _faulting(self) -> bool:
        """Whether _fault can inject a failure now (when not, it answers None undrawn)."""
        return bool(self.control.faults.error_rate)

    def _fault(self, method: str, path: str) -> Result | None:
        faults = self.control.faults
        if not faults.error_rate:  # none injected: nothing to match
            return None
        rate = faults.error_for(method, path)
        if rate > 0 and self._rng.random() < rate:
            return self.errors.server_error_result()
        return None

    # -- Web API ---------------------------------------------------------------------------------

    @staticmethod
    def _origin(request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/api/data/"):
            response: web.StreamResponse = await handler(request)
            return response
        loop = asyncio.get_running_loop()
        try:
            client = self.authority.check(request.headers.get("Authorization"),
                                          org_url=self._origin(request))
            self.limiter.begin(client, loop.time())
        except ApiError as exc:
            rejected = to_response(exc.result())
            if exc.status == 429:
                rejected.headers.update(self.limiter.headers(client))
            self._record(request.method, SimControl._route_name(request), rejected.status)
            return rejected
        started = loop.time()
        request[CLIENT_ID] = client
        try:
            response = await handler(request)
        finally:
            self.limiter.end(client, started, loop.time())
        response.headers.update(self.limiter.headers(client))
        return response

    async def _handle(self, request: web.Request) -> web.Response:
        m = _API_PATH.match(request.path)
        if m is None:  # pragma: no cover - routes only match API paths
            raise web.HTTPNotFound()
        body = await request.read()
        call = make_call(method=request.method, version=m.group(1), tail=m.group(2) or "",
                         query=request.query, headers=request.headers, body=body,
                         origin=self._origin(request), client_id=request[CLIENT_ID])
        if call.tail == "$batch":
            try:
                result = self.batch.run(call)
            except ApiError as exc:
                result = exc.result()
        else:
            result = self.api.handle(call)
        return to_response(result)

    async def _token(self, request: web.Request) -> web.Response:
        headers = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}
        try:
            ctype = request.headers.get("Content-Type", "")
            if not ctype.startswith("application/x-www-form-urlencoded"):
                raise TokenError(400, "invalid_request", 900144, "The request body must contain "
                                 "the following parameter: 'grant_type'.")
            form = {k: str(v) for k, v in (await request.post()).items()}
            body = self.authority.issue(tenant=request.match_info["tenant"], form=form,
                                        authorization=request.headers.get("Authorization"),
                                        org_url=self._origin(request))
            return json_response(body, headers=headers)
        except TokenError as exc:
            return json_response(exc.body(self.clock.now()), status=exc.status, headers=headers)

    # -- /_sim/ extras ---------------------------------------------------------------------------

    def _describe_limits(self) -> dict[str, Any]:
        return self.limiter.limits.describe()

    def _load_limits(self, body: dict[str, Any]) -> None:
        self.limiter.limits = ServiceLimits.from_body(body, self.limiter.limits)
        self.limiter.reset()

    def _saved(self) -> Path | None:
        return self.state_file if self.save() else None

    async def _tables(self, request: web.Request) -> web.Response:
        return json_response({
            "version": self.store.version,
            "tables": {n: {"rows": len(t.rows), "deleted": len(t.tombstones)}
                       for n, t in self.store.tables.items()},
            "list_members": {lid: len(m) for lid, m in self.store.members.items()},
        })

    async def _edit(self, request: web.Request) -> web.Response:
        try:
            body = await json_object(request)
        except ValueError as exc:
            return json_response({"error": f"bad edit: {exc}"}, status=400)
        status, answer = self._edit_answer(body)
        return json_response(answer, status=status)

    async def _edits(self, request: web.Request) -> web.Response:
        """Several users' edits (``{"edits": [<an /edit body>, ...]}``) in one request: each is
        applied in order, as that many ``/edit`` requests would be; one that is refused answers
        its error in its place in ``results`` (with the status ``/edit`` would answer) and the
        others still apply. For a load of many people's edits, without a request's cost
        each."""
        try:
            edits = (await json_object(request)).get("edits")
            if not isinstance(edits, list):
                raise ValueError('the body must look like {"edits": [...]}')
        except ValueError as exc:
            return json_response({"error": f"bad edits: {exc}"}, status=400)
        results: list[dict[str, Any]] = []
        for body in edits:
            status, answer = self._edit_answer(body)
            results.append(answer if status == 200 else {**answer, "status": status})
        return json_response({"results": results})

    def _edit_answer(self, body: Any) -> tuple[int, dict[str, Any]]:
        """One edit, as a user makes it (not the API: ``_editing``): the status and the answer
        ``/edit`` gives."""
        try:
            if not isinstance(body, dict) or not isinstance(body.get("email"), str):
                raise ValueError("body needs an 'email'")
            self._editing = True
            try:
                return 200, self._apply_edit(body)
            finally:
                self._editing = False
        except (ValueError, TypeError, KeyError) as exc:
            return 400, {"error": f"bad edit: {exc}"}
        except ApiError as exc:
            return exc.status, {"error": {"code": exc.code, "message": exc.message}}

    def _apply_edit(self, body: dict[str, Any]) -> dict[str, Any]:
        email = body["email"]
        for entity_set in ("contacts", "leads", "accounts"):
            found = self.store.tables[entity_set].lookup("emailaddress1", email)
            if found:
                record_set, record_id = entity_set, min(found)
                break
        else:
            raise ValueError(f"no contact, lead or account has the e-mail {email!r}")
        schema = TABLES[record_set]
        if "set" in body:
            row = self.writes.update(schema, record_id, body["set"])
            return {"entity_set": record_set, "id": record_id,
                    "versionnumber": row["versionnumber"]}
        account = str(body.get("account") or "demo")
        prefs = self.store.tables["psync_marketingpreferences"]
        matches = [i for i in prefs.lookup("psync_ecpreferenceid", int(body["preference_id"]))
                   if prefs.rows[i]["psync_ecaccount"] == account]
        if not matches:
            raise ValueError(f"no preference {body['preference_id']} for account {account!r}")
        pref_id = matches[0]
        subs = self.store.tables[SUBSCRIPTIONS.entity_set]
        column = f"_psync_{schema.logical}id_value"
        existing = [i for i in subs.lookup(column, record_id)
                    if subs.rows[i]["_psync_preferenceid_value"] == pref_id]
        status = body.get("status")
        if status is None:
            for sub_id in existing:
                self.writes.delete(SUBSCRIPTIONS, sub_id)
            return {"entity_set": SUBSCRIPTIONS.entity_set, "deleted": existing}
        if status not in ("opted_in", "opted_out"):
            raise ValueError("status must be 'opted_in', 'opted_out' or null")
        value = OPTED_IN if status == "opted_in" else OPTED_OUT
        if existing:
            row = self.writes.update(SUBSCRIPTIONS, existing[0], {"psync_status": value})
        else:
            row = self.writes.create(SUBSCRIPTIONS, {
                "psync_status": value,
                "psync_preferenceid@odata.bind": f"/psync_marketingpreferences({pref_id})",
                f"psync_{schema.logical}id@odata.bind": f"/{record_set}({record_id})"})
        return {"entity_set": SUBSCRIPTIONS.entity_set, "id": row[SUBSCRIPTIONS.pk],
                "versionnumber": row["versionnumber"], "record_id": record_id,
                "modifiedon": row["modifiedon"].isoformat().replace("+00:00", "Z")}


def build(*, clients: list[str] | tuple[str, ...], state_file: Path | None, retention: timedelta,
          token_lifetime_s: int, limits: ServiceLimits | None
          ) -> tuple[DynamicsApp, tuple[str, str, str] | None]:
    parsed = parse_clients(clients)
    generated = None
    if not parsed:
        client = demo_client()
        parsed = [client]
        generated = (client.tenant, client.client_id, client.secret)
    sim = DynamicsApp(clients=parsed, state_file=state_file, retention=retention,
                      token_lifetime_s=token_lifetime_s, limits=limits or ServiceLimits())
    return sim, generated
