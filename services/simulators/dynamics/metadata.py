"""The service document, ``$metadata`` (CSDL) and the ``EntityDefinitions`` look-ups clients make.

Supported: ``EntityDefinitions`` with ``$select``/``$filter`` (e.g.
``$filter=ChangeTrackingEnabled eq true`` or ``LogicalName eq 'contact'``) and
``$expand=Attributes[($select=...)]``; ``EntityDefinitions(LogicalName='x')`` or ``(<MetadataId>)``;
``.../Attributes``, ``.../Attributes(LogicalName='x')``,
``.../Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata`` (with
``$expand=OptionSet($select=Options)``) and ``.../Keys``.
"""

from __future__ import annotations

import re
import uuid
from typing import Any
from xml.sax.saxutils import quoteattr

from .odata import compile_filter, parse_select
from .protocol import Call, Result, json_result, no_property, query_error
from .schema import TABLES, Column, Kind, TableSchema

_NS = uuid.UUID("6f1c7a8e-4c55-4f1e-9a53-2b8f3d7d1c11")
_TYPE = {"String": "String", "Boolean": "Boolean", "Integer": "Integer", "BigInt": "BigInt",
         "Uniqueidentifier": "Uniqueidentifier", "Lookup": "Lookup", "DateTime": "DateTime",
         "Picklist": "Picklist", "State": "State", "Status": "Status",
         "EntityName": "EntityName"}


def _label(text: str) -> dict[str, Any]:
    localized = {"Label": text, "LanguageCode": 1033}
    return {"LocalizedLabels": [localized], "UserLocalizedLabel": localized}


def _schema_name(logical: str) -> str:
    prefix, sep, rest = logical.partition("_")
    if sep and prefix == "psync":
        return "psync_" + rest.replace("marketingpreference", "MarketingPreference").replace(
            "subscription", "Subscription")
    return logical[:1].upper() + logical[1:]


def entity_metadata(schema: TableSchema) -> dict[str, Any]:
    return {
        "MetadataId": str(uuid.uuid5(_NS, schema.logical)),
        "LogicalName": schema.logical,
        "SchemaName": _schema_name(schema.logical),
        "EntitySetName": schema.entity_set,
        "LogicalCollectionName": schema.entity_set,
        "CollectionSchemaName": _schema_name(schema.entity_set),
        "PrimaryIdAttribute": schema.pk,
        "PrimaryNameAttribute": schema.primary_name,
        "PrimaryImageAttribute": None,
        "ObjectTypeCode": schema.object_type_code,
        "ChangeTrackingEnabled": schema.change_tracking,
        "IsCustomEntity": schema.custom,
        "IsActivity": False,
        "IsOptimisticConcurrencyEnabled": True,
        "DisplayName": _label(schema.logical),
    }


def attribute_metadata(schema: TableSchema, col: Column) -> dict[str, Any]:
    atype = col.attribute_type
    out: dict[str, Any] = {
        "@odata.type": f"#Microsoft.Dynamics.CRM.{atype}AttributeMetadata",
        "MetadataId": str(uuid.uuid5(_NS, f"{schema.logical}.{col.name}")),
        "LogicalName": col.name,
        "SchemaName": col.name,
        "EntityLogicalName": schema.logical,
        "AttributeType": _TYPE[atype],
        "AttributeTypeName": {"Value": f"{_TYPE[atype]}Type"},
        "IsPrimaryId": col.name == schema.pk,
        "IsPrimaryName": col.name == schema.primary_name,
        "IsValidForRead": True,
        "IsValidForCreate": not col.read_only,
        "IsValidForUpdate": not col.read_only and col.name != schema.pk,
        "IsCustomAttribute": col.name.startswith(("psync_", "_psync_")),
    }
    if col.kind is Kind.STRING:
        out["MaxLength"] = col.max_length
    if col.kind is Kind.LOOKUP and col.target:
        out["Targets"] = [TABLES[col.target].logical]
    return out


def _options(col: Column) -> dict[str, Any]:
    return {"Options": [{"Value": v, "Label": _label(text)} for v, text in col.choices]}


def _meta_schema(name: str, pk: str, sample: dict[str, Any]) -> TableSchema:
    kinds = {bool: Kind.BOOL, int: Kind.INT, str: Kind.STRING}
    cols = {k: Column(name=k, kind=kinds.get(type(v), Kind.STRING)) for k, v in sample.items()
            if not k.startswith("@")}
    return TableSchema(logical=name, entity_set=name, pk=pk, primary_name="LogicalName",
                       columns=cols, object_type_code=0)


_ENTITY_META = _meta_schema("EntityMetadata", "MetadataId", entity_metadata(TABLES["contacts"]))
_ATTR_META = _meta_schema("AttributeMetadata", "MetadataId",
                          attribute_metadata(TABLES["contacts"], TABLES["contacts"].columns["fullname"]))

_KEY = re.compile(r"^(?:LogicalName\s*=\s*'([^']*)'|([0-9A-Fa-f-]{36}))$")


def _find_entity(key: str) -> TableSchema:
    m = _KEY.match(key)
    if m is None:
        raise query_error(f"Bad key '{key}' for EntityDefinitions.")
    for schema in TABLES.values():
        if m.group(1) == schema.logical or (
                m.group(2) and m.group(2).lower() == entity_metadata(schema)["MetadataId"]):
            return schema
    raise query_error(f"Could not find an entity with key {key}.", status=404)


def _apply(items: list[dict[str, Any]], call: Call, meta: TableSchema,
           allowed: set[str]) -> tuple[list[dict[str, Any]], list[str] | None]:
    for name in call.query:
        if name not in allowed:
            raise query_error(f"The query parameter {name} is not supported")
    select = parse_select(call.query["$select"], meta) if "$select" in call.query else None
    if "$filter" in call.query:
        pred = compile_filter(call.query["$filter"], meta, related=lambda s, i: None).predicate
        items = [i for i in items if pred(i)]
    if select is not None:
        items = [{k: v for k, v in i.items() if k in select or k in ("MetadataId", "@odata.type")}
                 for i in items]
    return items, select


def entity_definitions(call: Call, rest: str) -> Result:
    """``EntityDefinitions[...]`` in all the shapes listed in the module docstring."""
    root = call.service_root
    m = re.match(r"^EntityDefinitions(?:\(([^)]*)\))?(?:/(.*))?$", rest)
    if m is None:
        raise query_error(f"Resource not found for the segment '{rest}'.", status=404)
    key, sub = m.group(1), m.group(2)
    if key is None:
        if sub:
            raise query_error(f"Resource not found for the segment '{sub}'.", status=404)
        expand_attrs, attr_select = _attributes_expand(call)
        items = [entity_metadata(s) for s in TABLES.values()]
        items, _ = _apply(items, call, _ENTITY_META, {"$select", "$filter", "$expand"})
        if expand_attrs:
            for item in items:
                schema = next(s for s in TABLES.values() if s.logical == item.get("LogicalName")
                              or entity_metadata(s)["MetadataId"] == item["MetadataId"])
                attrs = [attribute_metadata(schema, c) for c in schema.columns.values()]
                if attr_select is not None:
                    attrs = [{k: v for k, v in a.items() if k in attr_select or k == "MetadataId"}
                             for a in attrs]
                item["Attributes"] = attrs
        return json_result({"@odata.context": f"{root}/$metadata#EntityDefinitions", "value": items})
    schema = _find_entity(key)
    if sub is None:
        items, _ = _apply([entity_metadata(schema)], call, _ENTITY_META, {"$select", "$expand"})
        expand_attrs, attr_select = _attributes_expand(call)
        item = items[0]
        if expand_attrs:
            item["Attributes"] = [attribute_metadata(schema, c) for c in schema.columns.values()]
        return json_result({"@odata.context": f"{root}/$metadata#EntityDefinitions/$entity",
                            **item})
    if sub == "Keys":
        keys = []
        if schema.unique:
            keys.append({"SchemaName": "psync_record_preference", "LogicalName":
                         "psync_record_preference", "KeyAttributes": list(schema.unique)})
        context = f"{root}/$metadata#EntityDefinitions('{schema.logical}')/Keys"
        return json_result({"@odata.context": context, "value": keys})
    am = re.match(r"^Attributes(?:\(LogicalName\s*=\s*'([^']*)'\))?"
                  r"(?:/Microsoft\.Dynamics\.CRM\.(\w+)AttributeMetadata)?$", sub)
    if am is None:
        raise query_error(f"Resource not found for the segment '{sub}'.", status=404)
    cols = list(schema.columns.values())
    if am.group(1) is not None:
        cols = [c for c in cols if c.name == am.group(1)]
        if not cols:
            raise no_property(am.group(1), "Microsoft.Dynamics.CRM.AttributeMetadata")
    if am.group(2) is not None:
        cols = [c for c in cols if c.attribute_type == am.group(2)]
    expand = call.query.get("$expand", "")
    allowed = {"$select", "$filter", "$expand"}
    attrs = [attribute_metadata(schema, c) for c in cols]
    items, _ = _apply(attrs, call, _ATTR_META, allowed)
    if expand.startswith("OptionSet"):
        by_name = {c.name: c for c in cols}
        for item in items:
            col = by_name.get(item.get("LogicalName", ""))
            if col is not None and col.choices:
                item["OptionSet"] = _options(col)
    elif expand:
        raise no_property(expand.split("(")[0], "Microsoft.Dynamics.CRM.AttributeMetadata")
    context = f"{root}/$metadata#EntityDefinitions('{schema.logical}')/Attributes"
    return json_result({"@odata.context": context, "value": items})


def _attributes_expand(call: Call) -> tuple[bool, list[str] | None]:
    expand = call.query.get("$expand")
    if not expand:
        return False, None
    m = re.match(r"^Attributes(?:\(\$select=([^)]*)\))?$", expand)
    if m is None:
        raise no_property(expand.split("(")[0], "Microsoft.Dynamics.CRM.EntityMetadata")
    return True, ([s.strip() for s in m.group(1).split(",")] if m.group(1) else None)


def service_document(call: Call) -> Result:
    value = [{"name": s, "kind": "EntitySet", "url": s} for s in sorted(TABLES)]
    value.append({"name": "EntityDefinitions", "kind": "EntitySet", "url": "EntityDefinitions"})
    return json_result({"@odata.context": f"{call.service_root}/$metadata", "value": value})


_EDM_XML = {Kind.STRING: "Edm.String", Kind.BOOL: "Edm.Boolean", Kind.INT: "Edm.Int32",
            Kind.BIGINT: "Edm.Int64", Kind.GUID: "Edm.Guid", Kind.LOOKUP: "Edm.Guid",
            Kind.DATETIME: "Edm.DateTimeOffset", Kind.CHOICE: "Edm.Int32"}


def csdl() -> Result:
    """A CSDL document describing the tables, with the change-tracking annotation per set."""
    lines = ['<?xml version="1.0" encoding="utf-8"?>',
             '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">',
             "<edmx:DataServices>",
             '<Schema Namespace="Microsoft.Dynamics.CRM" Alias="mscrm" '
             'xmlns="http://docs.oasis-open.org/odata/ns/edm">']
    for schema in TABLES.values():
        lines.append(f"<EntityType Name={quoteattr(schema.logical)}>")
        lines.append(f'<Key><PropertyRef Name="{schema.pk}" /></Key>')
        for col in schema.columns.values():
            lines.append(f"<Property Name={quoteattr(col.name)} Type=\"{_EDM_XML[col.kind]}\" />")
        for lookup in schema.lookups.values():
            target = TABLES[lookup.target].logical
            lines.append(f'<NavigationProperty Name="{lookup.nav}" '
                         f'Type="mscrm.{target}" />')
        lines.append("</EntityType>")
    lines.append('<EntityContainer Name="System">')
    for schema in TABLES.values():
        lines.append(f'<EntitySet Name="{schema.entity_set}" EntityType="mscrm.{schema.logical}">')
        lines.append('<Annotation Term="Org.OData.Capabilities.V1.ChangeTracking"><Record>'
                     f'<PropertyValue Property="Supported" Bool="{str(schema.change_tracking).lower()}" />'
                     "</Record></Annotation>")
        lines.append("</EntitySet>")
    lines += ["</EntityContainer>", "</Schema>", "</edmx:DataServices>", "</edmx:Edmx>"]
    return Result(200, "\n".join(lines).encode(),
                  {"Content-Type": "application/xml", "OData-Version": "4.0"})
