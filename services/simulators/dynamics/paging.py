"""``$skiptoken`` paging cookies, ``$deltatoken`` values and the links that carry them.

The skiptoken keeps Dataverse's paging-cookie shape::

    <cookie pagenumber="2" pagingcookie="<cookie page="1"><contactid last="{GUID}" first="{GUID}" />
    </cookie>" istracking="False" />

(the inner cookie percent-encoded). Each ordering column gets an element holding the last row's
value, so paging is keyset-based and stable while rows change. Change-tracking sessions add the
version the session started at; delta pages add which half (changed or deleted rows) they are in.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

from ..base import parse_time
from .protocol import query_error
from .schema import Kind, TableSchema


@dataclass
class Cookie:
    page: int  # the page the cookie was made from (1-based)
    last: list[tuple[str, Any]]  # ordering column -> the last row's value
    first_id: str | None = None
    tracking: bool = False
    attrs: dict[str, str] = field(default_factory=dict)


def _format(kind: Kind, value: Any) -> str:
    if kind in (Kind.GUID, Kind.LOOKUP):
        return "{" + str(value).upper() + "}"
    if kind is Kind.DATETIME:
        return str(value.isoformat().replace("+00:00", "Z"))
    if kind is Kind.BOOL:
        return "1" if value else "0"
    return str(value)


def _parse(kind: Kind, text: str) -> Any:
    if kind in (Kind.GUID, Kind.LOOKUP):
        return text.strip("{}").lower()
    if kind is Kind.DATETIME:
        return parse_time(text)
    if kind is Kind.BOOL:
        return text == "1"
    if kind in (Kind.INT, Kind.BIGINT, Kind.CHOICE):
        return int(text)
    return text


def encode_skiptoken(cookie: Cookie, schema: TableSchema) -> str:
    inner = ET.Element("cookie", {"page": str(cookie.page), **cookie.attrs})
    for name, value in cookie.last:
        kind = schema.columns[name].kind if name in schema.columns else Kind.BIGINT
        attrs = {} if value is None else {"last": _format(kind, value)}
        if name == schema.pk and cookie.first_id is not None:
            attrs["first"] = _format(Kind.GUID, cookie.first_id)
        ET.SubElement(inner, name, attrs)
    inner_xml = ET.tostring(inner, encoding="unicode")
    outer = ET.Element("cookie", {
        "pagenumber": str(cookie.page + 1),
        "pagingcookie": quote(inner_xml, safe=""),
        "istracking": "True" if cookie.tracking else "False",
    })
    return ET.tostring(outer, encoding="unicode")


def decode_skiptoken(token: str, schema: TableSchema) -> Cookie:
    try:
        outer = ET.fromstring(token)
        inner = ET.fromstring(unquote(outer.attrib["pagingcookie"]))
        page = int(inner.attrib.get("page", "1"))
        last: list[tuple[str, Any]] = []
        first_id = None
        for el in inner:
            kind = schema.columns[el.tag].kind if el.tag in schema.columns else Kind.BIGINT
            raw = el.attrib.get("last")
            last.append((el.tag, None if raw is None else _parse(kind, raw)))
            if el.tag == schema.pk and "first" in el.attrib:
                first_id = _parse(Kind.GUID, el.attrib["first"])
        attrs = {k: v for k, v in inner.attrib.items() if k != "page"}
        return Cookie(page=page, last=last, first_id=first_id,
                      tracking=outer.attrib.get("istracking") == "True", attrs=attrs)
    except (ET.ParseError, KeyError, ValueError):
        raise query_error("The $skiptoken is not valid for this query. Follow "
                          "@odata.nextLink unchanged.") from None


_DELTA = re.compile(r"^(\d+)!(\d\d)/(\d\d)/(\d{4}) (\d\d):(\d\d):(\d\d)$")


def encode_deltatoken(version: int, at: datetime) -> str:
    return f"{version}!{at.astimezone(UTC):%m/%d/%Y %H:%M:%S}"


def decode_deltatoken(token: str) -> tuple[int, datetime]:
    m = _DELTA.match(token)
    if m is None:
        raise query_error(f"The delta token '{token}' is not valid.")
    version, month, day, year, hh, mm, ss = (int(g) for g in m.groups())
    try:
        at = datetime(year, month, day, hh, mm, ss, tzinfo=UTC)
    except ValueError:
        raise query_error(f"The delta token '{token}' is not valid.") from None
    return version, at


_SAFE = "$,()'/:@=*"


def link(url: str, options: list[tuple[str, str]]) -> str:
    """``url`` with query ``options`` appended, each value percent-encoded once."""
    if not options:
        return url
    return url + "?" + "&".join(f"{k}={quote(v, safe=_SAFE)}" for k, v in options)


def token_value(token: str) -> str:
    """A token as it appears inside a link: fully percent-encoded."""
    return quote(token, safe="")


def link_with_token(url: str, options: list[tuple[str, str]], name: str, token: str,
                    drop: tuple[str, ...] = ()) -> str:
    kept = [(k, v) for k, v in options if k != name and k not in drop]
    base = link(url, kept)
    sep = "&" if kept else "?"
    return f"{base}{sep}{name}={token_value(token)}"
