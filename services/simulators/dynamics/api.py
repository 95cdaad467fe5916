"""The Web API resources: entity sets, single rows, navigation, ``$ref``, actions, counts.

Semantics that the Dataverse documentation leaves open, and the choice made here:

- ``$top`` together with ``Prefer: odata.maxpagesize``: ``$top`` is ignored (the 2024 docs).
  ``$top`` alone returns at most ``min($top, 5000)`` rows and no nextLink.
- ``odata.maxpagesize`` above 5000 is capped at 5000; ``Preference-Applied`` echoes the size used.
- ``@odata.count`` and ``GET /<set>/$count`` are capped at 5000.
- Query options refused with change tracking (``$filter``, ``$orderby``, ``$expand``, ``$top``):
  400 with the documented message. An expired ``$deltatoken`` (older than the retention,
  7 days by default): 400 ExpiredVersionStamp ``0x80044352`` (status inferred).
- Deltas list changed and created rows (version order, once each, latest state), then deleted
  rows; ``@odata.deltaLink`` only on the last page of a paged initial sync or delta.
- ``GET`` of an empty single-valued navigation property answers 204.
- ``AddMemberList`` answers 200 with ``{"Id": <list member id>}``; ``RemoveMemberList``, ``$ref``
  writes and removing a non-member answer 204.
- ``listmembers`` answers queries only (``GET /listmembers``, ``/$count``); anything else is
  400 "The '<message>' method does not support entities of type 'listmember'." (the platform's
  wording; status and empty code inferred).
- Change tracking asked of a table without it: 400 ChangeTrackingNotEnabledForEntity
  ``0x80072491`` (status inferred).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import orjson
from sortedcontainers import SortedSet  # type: ignore[import-untyped]

from .metadata import csdl, entity_definitions, service_document
from .odata import MAX_PAGE, Expand, QueryOptions, page_size, parse_options, parse_select
from .paging import (
    Cookie,
    decode_deltatoken,
    decode_skiptoken,
    encode_deltatoken,
    encode_skiptoken,
    link_with_token,
)
from .protocol import (
    CONCURRENCY_VERSION_MISMATCH,
    DUPLICATE_RECORD,
    EXPIRED_VERSION_STAMP,
    JSON_TYPE,
    ApiError,
    Call,
    Result,
    empty_result,
    json_result,
    not_found,
    query_error,
)
from .reads import (
    Source,
    annotations_wanted,
    context_fragment,
    count_rows,
    delta_entries,
    full_order,
    select_rows,
    shape,
)
from .routes import Target, resolve
from .schema import TABLES, TableSchema, many_to_many_for
from .store import Row, Store, listmember_id
from .writes import Writes, parse_guid, parse_ref

TRACKING_REFUSED = ("$filter", "$orderby", "$expand", "$top")
CHANGE_TRACKING_NOT_ENABLED = "0x80072491"
_WRITE_OPTIONS = frozenset({"$select"})
_CONTEXTS_KEPT = 256
# What each kind of request asks of a table, as the platform names the message.
_MESSAGES = {("collection", "POST"): "Create", ("entity", "GET"): "Retrieve",
             ("entity", "PATCH"): "Update", ("entity", "DELETE"): "Delete"}


def _method_not_allowed(method: str) -> ApiError:
    return ApiError(405, "0x80060888",
                    f"The requested resource does not support http method '{method}'.")


def _check_tracked(schema: TableSchema) -> None:
    if not schema.change_tracking:
        raise ApiError(400, CHANGE_TRACKING_NOT_ENABLED,
                       f"Entity {schema.logical} isn't enabled for change tracking.")


def _body(call: Call) -> Any:
    if not call.body:
        raise query_error("A request body is required.")
    try:
        return orjson.loads(call.body)
    except orjson.JSONDecodeError:
        raise query_error("The request body is not valid JSON.") from None


class Api:
    def __init__(self, *, store: Store, writes: Writes, now: Callable[[], datetime],
                 retention: timedelta) -> None:
        self.store = store
        self.writes = writes
        self.now = now
        self.retention = retention
        self._contexts: dict[tuple[str, str, str, tuple[str, ...]], str] = {}

    def related(self, entity_set: str, row_id: str) -> Row | None:
        return self.store.tables[entity_set].rows.get(row_id)

    def target(self, call: Call) -> Target:
        return resolve(call.version, call.tail)

    def handle(self, call: Call, target: Target | None = None) -> Result:
        target = target or self.target(call)
        try:
            return self._dispatch(call, target)
        except ApiError as exc:
            return exc.result()

    def _dispatch(self, call: Call, t: Target) -> Result:
        m = call.method
        if t.kind == "unknown":
            segment = t.rest.split("/")[0].split("(")[0] if t.rest else ""
            raise query_error(f"Resource not found for the segment '{segment}'.", status=404)
        if t.kind in ("service", "metadata", "entitydefs"):
            if m != "GET":
                raise _method_not_allowed(m)
            if t.kind == "service":
                return service_document(call)
            if t.kind == "metadata":
                return csdl()
            return entity_definitions(call, t.rest)
        schema = TABLES[t.entity_set]
        if schema.query_only and not (t.kind in ("collection", "count") and m == "GET"):
            message = _MESSAGES.get((t.kind, m), "Execute")
            raise ApiError(400, "", f"The '{message}' method does not support entities of type "
                           f"'{schema.logical}'.")
        if t.kind == "collection":
            if m == "GET":
                return self.get_collection(call, schema)
            if m == "POST":
                return self.create(call, schema)
        elif t.kind == "count" and m == "GET":
            return self.count(call, schema)
        elif t.kind == "set_action" and m == "POST":
            return self.update_multiple(call, schema)
        elif t.kind == "entity":
            row_id = parse_guid(t.key)
            if m == "GET":
                return self.get_entity(call, schema, row_id)
            if m == "PATCH":
                return self.patch(call, schema, row_id)
            if m == "DELETE":
                return self.delete(call, schema, row_id)
        elif t.kind == "nav":
            if m == "GET":
                return self.get_nav(call, schema, parse_guid(t.key), t.nav)
            if m == "PUT":
                return self.put_property(call, schema, parse_guid(t.key), t.nav)
        elif t.kind == "ref" and m in ("POST", "PUT", "DELETE"):
            return self.ref(call, schema, parse_guid(t.key), t.nav)
        elif t.kind == "navref" and m == "DELETE":
            return self.unref(call, schema, parse_guid(t.key), t.nav, parse_guid(t.nav_key))
        elif t.kind == "action" and m == "POST":
            return self.list_action(call, parse_guid(t.key), t.action)
        raise _method_not_allowed(m)

    # -- reads -----------------------------------------------------------------------------------

    def _row(self, schema: TableSchema, row_id: str) -> Row:
        row = self.store.tables[schema.entity_set].rows.get(row_id)
        if row is None:
            raise not_found(schema.logical, row_id)
        return row

    def get_collection(self, call: Call, schema: TableSchema, *, source: Source | None = None,
                       url: str | None = None, context: str | None = None) -> Result:
        prefer = call.prefer()
        tracking = "odata.track-changes" in prefer and source is None
        if tracking or "$deltatoken" in call.query:
            _check_tracked(schema)
            for name in TRACKING_REFUSED:
                if name in call.query:
                    raise query_error(f'The "{name[1:]}" query parameter isn\'t supported when '
                                      "Change Tracking is enabled.")
        opts = parse_options(call.query, schema, related=self.related)
        url = url or f"{call.service_root}/{schema.entity_set}"
        size = page_size(prefer)
        applied = []
        if tracking:
            applied.append("odata.track-changes")
        if size is not None:
            applied.append(f"odata.maxpagesize={size}")
        annotate = annotations_wanted(prefer)
        if annotate is not None:
            applied.append(f"odata.include-annotations={prefer['odata.include-annotations']}")
        headers = {"Preference-Applied": ",".join(applied)} if applied else {}
        if opts.deltatoken is not None:
            if source is not None:
                raise query_error("The query parameter $deltatoken is not supported for this "
                                  "request.")
            return self._delta(call, schema, opts, size or MAX_PAGE, url, headers, annotate)
        if source is None:
            source = Source(self.store.tables[schema.entity_set])
        limit = size or MAX_PAGE
        top_only = opts.top is not None and size is None
        if top_only:
            assert opts.top is not None
            limit = min(opts.top, MAX_PAGE)
        order = full_order(opts, schema)
        after: list[Any] | None = None
        page = 1
        snapshot = self.store.version
        if opts.skiptoken is not None:
            cookie = decode_skiptoken(opts.skiptoken, schema)
            if [c for c, _ in cookie.last] != [c for c, _ in order]:
                raise query_error("The $skiptoken doesn't belong to this query. Follow "
                                  "@odata.nextLink unchanged.")
            after = [v for _, v in cookie.last]
            if any(c == schema.pk and v is None for c, v in cookie.last):
                # every row has its key: a cookie without one was not made by a read of ours
                raise query_error("The $skiptoken is not valid for this query. Follow "
                                  "@odata.nextLink unchanged.")
            page = cookie.page + 1
            snapshot = int(cookie.attrs.get("snapshot", snapshot))
        rows, more = select_rows(source, opts, limit=limit, after=after)
        fragment = context or context_fragment(schema.entity_set, opts.select, opts.expand)
        body: dict[str, Any] = {"@odata.context": f"{call.service_root}/$metadata#{fragment}"}
        if opts.count:
            body["@odata.count"] = count_rows(source, opts)
        body["value"] = [shape(r, schema, opts.select, opts.expand, self.store, annotate)
                         for r in rows]
        if more and not top_only:
            last = rows[-1]
            cookie = Cookie(page=page, last=[(c, last.get(c)) for c, _ in order],
                            first_id=rows[0][schema.pk], tracking=tracking,
                            attrs={"snapshot": str(snapshot)} if tracking else {})
            body["@odata.nextLink"] = link_with_token(url, opts.raw, "$skiptoken",
                                                      encode_skiptoken(cookie, schema))
        elif tracking:
            body["@odata.deltaLink"] = self._delta_link(url, opts, snapshot)
        return json_result(body, headers=headers)

    def _delta_link(self, url: str, opts: QueryOptions, version: int) -> str:
        select = [(k, v) for k, v in opts.raw if k == "$select"]
        return link_with_token(url, select, "$deltatoken", encode_deltatoken(version, self.now()))

    def _check_token(self, token: str) -> int:
        version, at = decode_deltatoken(token)
        if at < self.now() - self.retention:
            raise ApiError(400, EXPIRED_VERSION_STAMP, "Version stamp associated with the client "
                           "has expired. Please perform a full sync.")
        if version > self.store.version:
            raise query_error(f"The delta token '{token}' is not valid.")
        return version

    def _delta(self, call: Call, schema: TableSchema, opts: QueryOptions, limit: int, url: str,
               headers: dict[str, str], annotate: Callable[[str], bool] | None) -> Result:
        assert opts.deltatoken is not None
        since = self._check_token(opts.deltatoken)
        table = self.store.tables[schema.entity_set]
        until = self.store.version
        deleted_phase, after_version, page = False, None, 1
        if opts.skiptoken is not None:
            cookie = decode_skiptoken(opts.skiptoken, schema)
            try:
                until = int(cookie.attrs["until"])
                deleted_phase = cookie.attrs["deleted"] == "1"
                after_version = int(cookie.last[0][1])
            except (KeyError, IndexError, TypeError, ValueError):
                raise query_error("The $skiptoken is not valid for this query.") from None
            page = cookie.page + 1
        entries, more = delta_entries(table, since=since, until=until, deleted_phase=deleted_phase,
                                      after_version=after_version, limit=limit)
        root = call.service_root
        value: list[dict[str, Any]] = []
        for deleted, _, row_id in entries:
            if deleted:
                value.append({"@odata.context": f"{root}/$metadata#{schema.entity_set}/$deletedEntity",
                              "id": row_id, "reason": "deleted"})
            else:
                value.append(shape(table.rows[row_id], schema, opts.select, store=self.store,
                                   annotate=annotate))
        fragment = context_fragment(schema.entity_set, opts.select)
        body: dict[str, Any] = {"@odata.context": f"{root}/$metadata#{fragment}/$delta",
                                "value": value}
        if more:
            last_deleted, last_version, _ = entries[-1]
            cookie = Cookie(page=page, last=[("versionnumber", last_version)], tracking=True,
                            attrs={"until": str(until), "deleted": "1" if last_deleted else "0"})
            body["@odata.nextLink"] = link_with_token(url, opts.raw, "$skiptoken",
                                                      encode_skiptoken(cookie, schema))
        else:
            body["@odata.deltaLink"] = self._delta_link(url, opts, until)
        return json_result(body, headers=headers)

    def count(self, call: Call, schema: TableSchema) -> Result:
        opts = parse_options(call.query, schema, related=self.related,
                             allowed=frozenset({"$filter", "$deltatoken"}))
        table = self.store.tables[schema.entity_set]
        if opts.deltatoken is not None:
            _check_tracked(schema)
            since = self._check_token(opts.deltatoken)
            entries, _ = delta_entries(table, since=since, until=self.store.version,
                                       deleted_phase=False, after_version=None, limit=MAX_PAGE)
            n = len(entries)
        else:
            n = count_rows(Source(table), opts)
        return Result(200, f"\ufeff{n}".encode(), {"Content-Type": "text/plain",
                                                   "OData-Version": "4.0"})

    def get_entity(self, call: Call, schema: TableSchema, row_id: str) -> Result:
        opts = parse_options(call.query, schema, related=self.related,
                             allowed=frozenset({"$select", "$expand"}))
        row = self._row(schema, row_id)
        etag = f'W/"{row["versionnumber"]}"'
        if_none = call.headers.get("If-None-Match")
        annotations = "odata.include-annotations" in call.prefer()
        if if_none and not opts.expand and not annotations and etag in _etags(if_none):
            return empty_result(304)
        return self._entity_result(call, schema, row, opts.select, opts)

    def _entity_result(self, call: Call, schema: TableSchema, row: Row, select: list[str] | None,
                       opts: QueryOptions | None = None) -> Result:
        expand = opts.expand if opts else None
        annotate = annotations_wanted(call.prefer())
        body = shape(row, schema, select, expand, self.store, annotate,
                     context=self._entity_context(call, schema, select, expand))
        return json_result(body)

    def _entity_context(self, call: Call, schema: TableSchema, select: list[str] | None,
                        expand: list[Expand] | None) -> str:
        """``@odata.context`` of one row; without ``$expand`` remembered per root, table and
        ``$select`` (every write of a batch answers with the same one)."""
        if expand:
            fragment = context_fragment(schema.entity_set, select, expand)
            return f"{call.service_root}/$metadata#{fragment}/$entity"
        key = (call.origin, call.version, schema.entity_set, tuple(select) if select else ())
        context = self._contexts.get(key)
        if context is None:
            if len(self._contexts) >= _CONTEXTS_KEPT:
                self._contexts.clear()
            fragment = context_fragment(schema.entity_set, select)
            context = self._contexts[key] = f"{call.service_root}/$metadata#{fragment}/$entity"
        return context

    def get_nav(self, call: Call, schema: TableSchema, row_id: str, nav: str) -> Result:
        row = self._row(schema, row_id)
        lookup = schema.lookups.get(nav)
        if lookup is not None:
            target = TABLES[lookup.target]
            ref = row.get(lookup.column)
            if ref is None:
                return empty_result(204)
            opts = parse_options(call.query, target, related=self.related,
                                 allowed=frozenset({"$select"}))
            return self._entity_result(call, target, self._row(target, ref), opts.select)
        rel = many_to_many_for(schema.entity_set, nav)
        if rel is not None:
            if schema.entity_set == "lists":
                member_schema = TABLES[rel.member_set]
                if self.writes.member_set(row_id) != rel.member_set:
                    ids = SortedSet()
                else:
                    ids = self.store.members.get(row_id) or SortedSet()
                source = Source(self.store.tables[rel.member_set], ids)
            else:
                member_schema = TABLES["lists"]
                lists = self.store.tables["lists"]
                mine = SortedSet(self.store.member_of.get(row_id, ()))
                ids = SortedSet(i for i in mine
                                if lists.rows[i]["createdfromcode"] == rel.created_from_code)
                source = Source(lists, ids)
            url = f"{call.service_root}/{schema.entity_set}({row_id})/{nav}"
            return self.get_collection(call, member_schema, source=source, url=url)
        col = schema.columns.get(nav)
        if col is None:
            raise query_error(f"Resource not found for the segment '{nav}'.", status=404)
        context = f"{call.service_root}/$metadata#{schema.entity_set}({row_id})/{nav}"
        return json_result({"@odata.context": context, "value": row.get(nav)})

    # -- writes ----------------------------------------------------------------------------------

    def _written(self, call: Call, schema: TableSchema, row: Row, *, created: bool,
                 select: list[str] | None) -> Result:
        """The answer to a write; ``select`` is the request's ``$select``, parsed."""
        return self.write_answer(call, schema, select).result(row, created=created)

    def write_answer(self, call: Call, schema: TableSchema,
                     select: list[str] | None) -> WriteAnswer:
        """How a write of ``schema`` asked by ``call`` is answered (its body aside)."""
        prefer = call.prefer()
        if prefer.get("return") == "representation":
            annotate = annotations_wanted(prefer)
            # the columns of the row returned, as shape lists them (only unannotated rows are
            # laid out without it)
            columns = (None if annotate is not None else tuple(schema.columns)
                       if select is None else (*select, schema.pk))
            return WriteAnswer(schema, self.store, select, annotate,
                               self._entity_context(call, schema, select, None), "", columns)
        return WriteAnswer(schema, self.store, select, None, None,
                           f"{call.service_root}/{schema.entity_set}(")

    def write_select(self, call: Call, schema: TableSchema) -> list[str] | None:
        """A write's ``$select`` (its only query option), checked before anything is written."""
        query = call.query
        if not query:
            return None
        if len(query) == 1 and "$select" in query:  # what parse_options would do with it
            return parse_select(query["$select"], schema)
        return parse_options(call.query, schema, related=self.related,
                             allowed=_WRITE_OPTIONS).select

    def create(self, call: Call, schema: TableSchema) -> Result:
        select = self.write_select(call, schema)
        row = self.writes.create(schema, _body(call))
        return self._written(call, schema, row, created=True, select=select)

    def patch(self, call: Call, schema: TableSchema, row_id: str) -> Result:
        select = self.write_select(call, schema)
        body = _body(call)
        table = self.store.tables[schema.entity_set]
        exists = row_id in table.rows
        if_match = call.headers.get("If-Match")
        if_none = call.headers.get("If-None-Match")
        if if_none == "*":
            if exists:
                raise ApiError(412, DUPLICATE_RECORD,
                               "A record with matching key values already exists.")
            row = self.writes.create(schema, body, row_id=row_id)
            return self._written(call, schema, row, created=True, select=select)
        if if_match:
            self._match(schema, row_id, if_match)
        if exists:
            row = self.writes.update(schema, row_id, body)
            return self._written(call, schema, row, created=False, select=select)
        row = self.writes.create(schema, body, row_id=row_id)
        return self._written(call, schema, row, created=True, select=select)

    def _match(self, schema: TableSchema, row_id: str, if_match: str) -> None:
        row = self._row(schema, row_id)
        etags = _etags(if_match)
        if "*" not in etags and f'W/"{row["versionnumber"]}"' not in etags:
            raise ApiError(412, CONCURRENCY_VERSION_MISMATCH, "The version of the existing record "
                           "doesn't match the RowVersion property provided.")

    def delete(self, call: Call, schema: TableSchema, row_id: str) -> Result:
        if_match = call.headers.get("If-Match")
        if if_match:
            self._match(schema, row_id, if_match)
        with self.store.atomic():
            self.writes.delete(schema, row_id)
        return empty_result(204)

    def put_property(self, call: Call, schema: TableSchema, row_id: str, prop: str) -> Result:
        if prop not in schema.columns:
            raise query_error(f"Resource not found for the segment '{prop}'.", status=404)
        body = _body(call)
        if not isinstance(body, dict) or "value" not in body:
            raise query_error("The request body must be an object with a 'value' property.")
        self.writes.update(schema, row_id, {prop: body["value"]})
        return empty_result(204)

    def update_multiple(self, call: Call, schema: TableSchema) -> Result:
        body = _body(call)
        targets = body.get("Targets") if isinstance(body, dict) else None
        if not isinstance(targets, list):
            raise query_error("UpdateMultiple needs a 'Targets' array.")
        with self.store.atomic():
            for target in targets:
                if not isinstance(target, dict) or schema.pk not in target:
                    raise query_error(f"Each target needs its key '{schema.pk}'.")
                odata_type = target.get("@odata.type")
                if odata_type is not None and odata_type.lstrip("#") != schema.type_name:
                    raise query_error(f"The target type '{odata_type}' doesn't match the entity "
                                      f"set '{schema.entity_set}'.")
                row_id = parse_guid(str(target[schema.pk]))
                changes = {k: v for k, v in target.items() if k != schema.pk}
                self.writes.update(schema, row_id, changes)
        return empty_result(204)

    # -- relationships ---------------------------------------------------------------------------

    def ref(self, call: Call, schema: TableSchema, row_id: str, nav: str) -> Result:
        self._row(schema, row_id)
        lookup = schema.lookups.get(nav)
        if lookup is not None:
            if call.method == "DELETE":
                self.writes.update(schema, row_id, {f"{nav}@odata.bind": None})
                return empty_result(204)
            if call.method != "PUT":
                raise _method_not_allowed(call.method)
            body = _body(call)
            ref = body.get("@odata.id") if isinstance(body, dict) else None
            self.writes.update(schema, row_id, {f"{nav}@odata.bind": ref})
            return empty_result(204)
        rel = many_to_many_for(schema.entity_set, nav)
        if rel is None:
            raise query_error(f"Resource not found for the segment '{nav}'.", status=404)
        if call.method != "POST":
            raise _method_not_allowed(call.method)
        body = _body(call)
        other_set, other_id = parse_ref(body.get("@odata.id") if isinstance(body, dict) else None)
        if schema.entity_set == "lists":
            list_id, member_id = row_id, other_id
            if other_set != rel.member_set:
                raise query_error(f"'{nav}' relates lists to {rel.member_set}, not {other_set}.")
        else:
            list_id, member_id = other_id, row_id
            if other_set != "lists":
                raise query_error(f"'{nav}' relates {schema.entity_set} to lists, not {other_set}.")
        self.writes.add_member(list_id, member_id, relationship=rel.name)
        return empty_result(204)

    def unref(self, call: Call, schema: TableSchema, row_id: str, nav: str,
              other_id: str) -> Result:
        rel = many_to_many_for(schema.entity_set, nav)
        if rel is None:
            raise query_error(f"Resource not found for the segment '{nav}'.", status=404)
        self._row(schema, row_id)
        if schema.entity_set == "lists":
            self._row(TABLES[rel.member_set], other_id)
            self.writes.remove_member(row_id, other_id)
        else:
            self._row(TABLES["lists"], other_id)
            self.writes.remove_member(other_id, row_id)
        return empty_result(204)

    def list_action(self, call: Call, list_id: str, action: str) -> Result:
        body = _body(call)
        entity = body.get("EntityId") if isinstance(body, dict) else None
        if not isinstance(entity, str):
            raise query_error(f"{action} needs an 'EntityId' parameter (a GUID).")
        member_id = parse_guid(entity)
        if action == "AddMemberList":
            self.writes.add_member(list_id, member_id)
            member_row = listmember_id(list_id, member_id)
            context = f"{call.service_root}/$metadata#Microsoft.Dynamics.CRM.AddMemberListResponse"
            return json_result({"@odata.context": context, "Id": member_row})
        self.writes.remove_member(list_id, member_id)
        return empty_result(204)


class WriteAnswer(NamedTuple):
    """The answer to a write, but for the row written: every write of a batch sent with the
    same request head is answered alike."""

    schema: TableSchema
    store: Store
    select: list[str] | None  # the request's $select, parsed
    annotate: Callable[[str], bool] | None
    context: str | None  # the row's @odata.context: the row is returned (return=representation)
    entity_id: str  # else: the start of its OData-EntityId
    columns: tuple[str, ...] | None = None  # the row's columns returned, when not annotated

    def result(self, row: Row, *, created: bool) -> Result:
        if self.context is not None:
            etag = f'W/"{row["versionnumber"]}"'
            return Result(201 if created else 200, self.body(row, etag), self.headers(etag))
        return Result(204, b"", {"OData-Version": "4.0",
                                 "OData-EntityId": f"{self.entity_id}{row[self.schema.pk]})"})

    def body(self, row: Row, etag: str) -> bytes:
        """The row returned (as _entity_result answers a row without $expand)."""
        columns = self.columns
        if columns is None:
            return orjson.dumps(shape(row, self.schema, self.select, None, self.store,
                                      self.annotate, context=self.context, etag=etag),
                                option=orjson.OPT_UTC_Z)
        # laid out as shape lays out a row neither annotated nor expanded, without its call
        out: dict[str, Any] = ({"@odata.etag": etag} if self.context is None
                               else {"@odata.context": self.context, "@odata.etag": etag})
        get = row.get
        for column in columns:
            out[column] = get(column)
        return orjson.dumps(out, option=orjson.OPT_UTC_Z)

    @staticmethod
    def headers(etag: str) -> dict[str, str]:
        """The headers of a row returned (json_result's, then the write's own)."""
        return {"Content-Type": JSON_TYPE, "OData-Version": "4.0", "ETag": etag,
                "Preference-Applied": "return=representation"}


def _etags(header: str) -> set[str]:
    if "," not in header:  # one tag, as clients mostly send
        return {header.strip()}
    return {e.strip() for e in header.split(",")}

