"""OData query options as Dataverse reads them: parsing, validation, ``$filter`` compilation.

``$filter`` text is parsed by the odata-query grammar; the AST is compiled here into a row
predicate plus, where possible, an index plan (an ``eq``/``or``-chain of ``eq`` on an indexed
column, or a range on ``modifiedon``) so most filters don't scan the table.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from odata_query import ast as o
from odata_query.exceptions import ODataException
from odata_query.grammar import ODataLexer, ODataParser

from ..base import parse_time
from .protocol import no_property, query_error
from .schema import TABLES, Column, Kind, TableSchema
from .store import Row

Predicate = Callable[[Row], bool]
Related = Callable[[str, str], Row | None]  # (entity set, id) -> row

KNOWN_OPTIONS = frozenset({"$select", "$filter", "$orderby", "$top", "$count", "$expand",
                           "$skiptoken", "$deltatoken"})
MAX_PAGE = 5000


@dataclass(frozen=True)
class KeysPlan:
    """Rows whose ``column`` equals one of ``keys``: an indexed column's (index keys, strings
    lower-cased), or the primary key's (the row with that id)."""

    pairs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class RangePlan:
    """Rows whose ``modifiedon`` lies in a range (``None`` = unbounded); for a query-only table
    (rows never updated) also a range of ``createdon``."""

    lo: datetime | None = None
    lo_incl: bool = True
    hi: datetime | None = None
    hi_incl: bool = True


Plan = KeysPlan | RangePlan | None


@dataclass
class Filter:
    text: str
    predicate: Predicate
    plan: Plan


@dataclass
class Expand:
    nav: str
    target: TableSchema
    column: str  # _x_value
    select: list[str] | None


@dataclass
class QueryOptions:
    raw: list[tuple[str, str]] = field(default_factory=list)  # as given, for nextLinks
    select: list[str] | None = None
    filter: Filter | None = None
    orderby: list[tuple[str, bool]] = field(default_factory=list)  # (column, descending)
    top: int | None = None
    count: bool = False
    expand: list[Expand] = field(default_factory=list)
    skiptoken: str | None = None
    deltatoken: str | None = None


def parse_options(query: Mapping[str, str] | Any, schema: TableSchema, *,
                  related: Related, allowed: frozenset[str] = KNOWN_OPTIONS) -> QueryOptions:
    opts = QueryOptions(raw=[(k, v) for k, v in query.items()])
    seen: set[str] = set()
    for name, value in opts.raw:
        if name in seen:
            raise query_error(f"Query option '{name}' was specified more than once, "
                              "but it must be specified at most once.")
        seen.add(name)
        if name not in KNOWN_OPTIONS:
            if name in ("$skip", "$search", "$format", "$apply", "$levels"):
                raise query_error(f"The query parameter {name} is not supported")
            if name.startswith("@"):
                raise query_error(f"The parameter alias '{name}' is not supported.")
            raise query_error(f"The query parameter {name} is not supported")
        if name not in allowed:
            raise query_error(f"The query parameter {name} is not supported for this request.")
        if name == "$select":
            opts.select = parse_select(value, schema)
        elif name == "$filter":
            opts.filter = compile_filter(value, schema, related=related)
        elif name == "$orderby":
            opts.orderby = parse_orderby(value, schema)
        elif name == "$top":
            if not value.isdigit() or int(value) < 0:
                raise query_error(f"Invalid value '{value}' for $top query option found. "
                                  "The $top query option requires a non-negative integer value.")
            opts.top = int(value)
        elif name == "$count":
            if value not in ("true", "false"):
                raise query_error(f"'{value}' is not a valid count option.")
            opts.count = value == "true"
        elif name == "$expand":
            opts.expand = parse_expand(value, schema)
        elif name == "$skiptoken":
            opts.skiptoken = value
        elif name == "$deltatoken":
            opts.deltatoken = value
    return opts


def _column(schema: TableSchema, name: str) -> Column:
    col = schema.columns.get(name)
    if col is None:
        raise no_property(name, schema.type_name)
    return col


# Valid ``$select`` texts by table: clients ask the same columns over and over (a batch of
# writes asks them of every operation). Only valid ones are kept; a bad one is refused anew.
_SELECTS: dict[tuple[int, str], tuple[TableSchema, tuple[str, ...]]] = {}
_SELECTS_KEPT = 512


def parse_select(value: str, schema: TableSchema) -> list[str]:
    known = _SELECTS.get((id(schema), value))
    if known is not None and known[0] is schema:
        return list(known[1])
    out = _parse_select(value, schema)
    if len(_SELECTS) >= _SELECTS_KEPT:
        _SELECTS.clear()
    _SELECTS[(id(schema), value)] = (schema, tuple(out))
    return out


def _parse_select(value: str, schema: TableSchema) -> list[str]:
    names = [n.strip() for n in value.split(",")]
    if not value.strip() or any(not n for n in names):
        raise query_error("Syntax error: character ',' is not valid at this position in $select.")
    out: list[str] = []
    for name in names:
        if name == "*":
            return list(schema.columns)
        _column(schema, name)
        if name not in out:
            out.append(name)
    return out


def parse_orderby(value: str, schema: TableSchema) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for item in value.split(","):
        words = item.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1] not in ("asc", "desc")):
            raise query_error(f"Syntax error at position {len(value)} in '{value}'.")
        _column(schema, words[0])
        out.append((words[0], len(words) == 2 and words[1] == "desc"))
    return out


def _split_top_level(value: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in value:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_expand(value: str, schema: TableSchema) -> list[Expand]:
    out: list[Expand] = []
    for item in _split_top_level(value):
        nav, _, rest = item.partition("(")
        nav = nav.strip()
        lookup = schema.lookups.get(nav)
        if lookup is None:
            if nav in schema.columns or nav.startswith("list"):
                raise query_error("Only single-valued (lookup) navigation properties can be "
                                  f"expanded here; '{nav}' is not one.")
            raise no_property(nav, schema.type_name)
        target = TABLES[lookup.target]
        select: list[str] | None = None
        if rest:
            if not rest.endswith(")"):
                raise query_error(f"Syntax error in $expand at '{item}'.")
            for opt in rest[:-1].split(";"):
                key, _, val = opt.partition("=")
                if key.strip() != "$select":
                    raise query_error(f"The query option '{key.strip()}' is not supported "
                                      "inside $expand of a single-valued navigation property.")
                select = parse_select(val, target)
        out.append(Expand(nav=nav, target=target, column=lookup.column, select=select))
    return out


# -- $filter -------------------------------------------------------------------------------------

_lexer = ODataLexer()
_parser = ODataParser()

_OPS: dict[type, str] = {o.Eq: "Equal", o.NotEq: "NotEqual", o.Lt: "LessThan",
                         o.LtE: "LessThanOrEqual", o.Gt: "GreaterThan", o.GtE: "GreaterThanOrEqual"}
_FLIP: dict[type, type] = {o.Eq: o.Eq, o.NotEq: o.NotEq, o.Lt: o.Gt, o.LtE: o.GtE, o.Gt: o.Lt,
                           o.GtE: o.LtE}


def compile_filter(text: str, schema: TableSchema, *, related: Related) -> Filter:
    try:
        tree = _parser.parse(_lexer.tokenize(text))
    except ODataException as exc:
        raise query_error(f"Syntax error in $filter '{text}': {exc}") from None
    except Exception:  # the grammar raises plain errors on some malformed input
        raise query_error(f"Syntax error in $filter '{text}'.") from None
    compiler = _Compiler(schema, related)
    predicate = compiler.boolean(tree)
    return Filter(text=text, predicate=predicate, plan=plan_for(tree, schema))


def _literal(node: o._Node) -> tuple[str, Any] | None:
    """(edm type, python value) of a literal node, or None when ``node`` is no literal."""
    if isinstance(node, o.Null):
        return "null", None
    if isinstance(node, o.Boolean):
        return "Edm.Boolean", node.val.lower() == "true"
    if isinstance(node, o.Integer):
        return "Edm.Int32", int(node.val)
    if isinstance(node, o.Float):
        return "Edm.Decimal", float(node.val)
    if isinstance(node, o.String):
        return "Edm.String", node.val
    if isinstance(node, o.GUID):
        return "Edm.Guid", str(uuid.UUID(node.val))
    if isinstance(node, o.DateTime):
        return "Edm.DateTimeOffset", parse_time(node.val)
    if isinstance(node, o.Date):
        return "Edm.DateTimeOffset", datetime.fromisoformat(node.val).replace(tzinfo=UTC)
    if isinstance(node, o._Literal):
        return type(node).__name__, None
    return None


_ACCEPTS: dict[Kind, frozenset[str]] = {
    Kind.STRING: frozenset({"Edm.String"}),
    Kind.BOOL: frozenset({"Edm.Boolean"}),
    Kind.INT: frozenset({"Edm.Int32", "Edm.Decimal"}),
    Kind.BIGINT: frozenset({"Edm.Int32", "Edm.Decimal"}),
    Kind.CHOICE: frozenset({"Edm.Int32"}),
    Kind.GUID: frozenset({"Edm.Guid"}),
    Kind.LOOKUP: frozenset({"Edm.Guid"}),
    Kind.DATETIME: frozenset({"Edm.DateTimeOffset"}),
}


class _Compiler:
    def __init__(self, schema: TableSchema, related: Related) -> None:
        self.schema = schema
        self.related = related

    def field(self, node: o._Node) -> tuple[Column, Callable[[Row], Any]] | None:
        if isinstance(node, o.Identifier):
            col = _column(self.schema, node.name)
            name = col.name
            return col, lambda row: row.get(name)
        if isinstance(node, o.Attribute) and isinstance(node.owner, o.Identifier):
            lookup = self.schema.lookups.get(node.owner.name)
            if lookup is None:
                raise no_property(node.owner.name, self.schema.type_name)
            target = TABLES[lookup.target]
            col = _column(target, node.attr)
            column, target_set, attr, related = lookup.column, target.entity_set, col.name, \
                self.related

            def through(row: Row) -> Any:
                ref = row.get(column)
                other = related(target_set, ref) if ref is not None else None
                return other.get(attr) if other is not None else None

            return col, through
        return None

    def boolean(self, node: o._Node) -> Predicate:
        if isinstance(node, o.BoolOp):
            left, right = self.boolean(node.left), self.boolean(node.right)
            if isinstance(node.op, o.And):
                return lambda row: left(row) and right(row)
            return lambda row: left(row) or right(row)
        if isinstance(node, o.UnaryOp) and isinstance(node.op, o.Not):
            inner = self.boolean(node.operand)
            return lambda row: not inner(row)
        if isinstance(node, o.Compare):
            return self.compare(node)
        if isinstance(node, o.Call):
            return self.call(node)
        if isinstance(node, o.Identifier):
            col, get = self._field_or_fail(node)
            if col.kind is not Kind.BOOL:
                raise query_error(f"The $filter expression must evaluate to a single boolean "
                                  f"value; '{node.name}' is of type '{col.kind.edm}'.")
            return lambda row: bool(get(row))
        raise query_error(f"The $filter expression '{type(node).__name__}' is not supported.")

    def _field_or_fail(self, node: o._Node) -> tuple[Column, Callable[[Row], Any]]:
        found = self.field(node)
        if found is None:
            raise query_error("Only comparisons between a property and a literal are supported "
                              "in $filter.")
        return found

    def compare(self, node: o.Compare) -> Predicate:
        comparator: type = type(node.comparator)
        if comparator not in _OPS:
            raise query_error(f"The operator '{comparator.__name__}' is not supported in $filter.")
        left, right = node.left, node.right
        if _literal(left) is not None and _literal(right) is None:
            left, right, comparator = right, left, _FLIP[comparator]
        lit = _literal(right)
        if lit is None:
            raise query_error("Only comparisons between a property and a literal are supported "
                              "in $filter.")
        col, get = self._field_or_fail(left)
        edm, value = lit
        if edm != "null" and edm not in _ACCEPTS[col.kind]:
            raise query_error(
                "A binary operator with incompatible types was detected. Found operand types "
                f"'{col.kind.edm}' and '{edm}' for operator kind '{_OPS[comparator]}'.")
        if value is None:
            if comparator is o.Eq:
                return lambda row: get(row) is None
            if comparator is o.NotEq:
                return lambda row: get(row) is not None
            return lambda row: False
        if col.kind is Kind.STRING:
            value = value.lower()
            base = get

            def get(row: Row) -> Any:
                v = base(row)
                return v.lower() if v is not None else None
        return _comparison(comparator, get, value)

    def call(self, node: o.Call) -> Predicate:
        name = node.func.name
        if name not in ("contains", "startswith", "endswith"):
            raise query_error(f"The '{name}' function is not supported.")
        if len(node.args) != 2:
            raise query_error(f"The '{name}' function takes two arguments.")
        col, get = self._field_or_fail(node.args[0])
        lit = _literal(node.args[1])
        if col.kind is not Kind.STRING or lit is None or lit[0] != "Edm.String":
            raise query_error(f"The '{name}' function needs a string property and a string "
                              "literal.")
        needle = str(lit[1]).lower()

        def value(row: Row) -> str | None:
            v = get(row)
            return v.lower() if v is not None else None

        if name == "contains":
            return lambda row: (v := value(row)) is not None and needle in v
        if name == "startswith":
            return lambda row: (v := value(row)) is not None and v.startswith(needle)
        return lambda row: (v := value(row)) is not None and v.endswith(needle)


def _comparison(comparator: type, get: Callable[[Row], Any], value: Any) -> Predicate:
    if comparator is o.Eq:
        return lambda row: get(row) == value
    if comparator is o.NotEq:
        return lambda row: get(row) != value
    if comparator is o.Lt:
        return lambda row: (v := get(row)) is not None and v < value
    if comparator is o.LtE:
        return lambda row: (v := get(row)) is not None and v <= value
    if comparator is o.Gt:
        return lambda row: (v := get(row)) is not None and v > value
    return lambda row: (v := get(row)) is not None and v >= value


# -- index plans ---------------------------------------------------------------------------------

def plan_for(node: o._Node, schema: TableSchema) -> Plan:
    """An index plan whose rows are a superset of the filter's matches, or None (scan)."""
    if isinstance(node, o.Compare) and isinstance(node.left, o.Identifier):
        lit = _literal(node.right)
        name = node.left.name
        if lit is None or lit[1] is None:
            return None
        if isinstance(node.comparator, o.Eq) and name in schema.indexed:
            value = lit[1]
            return KeysPlan(pairs=((name, value.lower() if isinstance(value, str) else value),))
        if isinstance(node.comparator, o.Eq) and name == schema.pk:
            # the row with that id (the key as given: ids are matched exactly)
            return KeysPlan(pairs=((name, lit[1]),))
        # rows of a query-only table are never updated: their createdon is their modifiedon
        if (name == "modifiedon" or (name == "createdon" and schema.query_only)) \
                and isinstance(lit[1], datetime):
            dt = lit[1]
            if isinstance(node.comparator, o.Eq):
                return RangePlan(lo=dt, hi=dt)
            if isinstance(node.comparator, (o.Gt, o.GtE)):
                return RangePlan(lo=dt, lo_incl=isinstance(node.comparator, o.GtE))
            if isinstance(node.comparator, (o.Lt, o.LtE)):
                return RangePlan(hi=dt, hi_incl=isinstance(node.comparator, o.LtE))
        return None
    if isinstance(node, o.BoolOp):
        left, right = plan_for(node.left, schema), plan_for(node.right, schema)
        if isinstance(node.op, o.Or):
            if isinstance(left, KeysPlan) and isinstance(right, KeysPlan):
                return KeysPlan(pairs=left.pairs + right.pairs)
            return None
        if isinstance(left, KeysPlan):
            return left
        if isinstance(right, KeysPlan):
            return right
        if isinstance(left, RangePlan) and isinstance(right, RangePlan):
            return _intersect(left, right)
        return left or right
    return None


def _intersect(a: RangePlan, b: RangePlan) -> RangePlan:
    lo, lo_incl = a.lo, a.lo_incl
    if b.lo is not None and (lo is None or b.lo > lo or (b.lo == lo and not b.lo_incl)):
        lo, lo_incl = b.lo, b.lo_incl
    hi, hi_incl = a.hi, a.hi_incl
    if b.hi is not None and (hi is None or b.hi < hi or (b.hi == hi and not b.hi_incl)):
        hi, hi_incl = b.hi, b.hi_incl
    return RangePlan(lo=lo, lo_incl=lo_incl, hi=hi, hi_incl=hi_incl)


def page_size(prefer: Mapping[str, str]) -> int | None:
    """The ``odata.maxpagesize`` preference, capped at 5000; None when absent or malformed."""
    raw = prefer.get("odata.maxpagesize")
    if raw is None:
        return None
    try:
        size = int(raw.strip('"'))
    except ValueError:
        return None
    return min(size, MAX_PAGE) if size > 0 else None

