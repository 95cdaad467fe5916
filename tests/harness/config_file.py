"""A prefsync config file written from the mapping the worlds of the tests and of ``bench/``
also parse directly (``common.config.parse_config``), so both say the same."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson


def _line(key: str, value: Any) -> str:
    # JSON strings, numbers and booleans are TOML too
    return f"{key} = {orjson.dumps(value).decode()}"


def _table(header: str, values: Mapping[str, Any]) -> list[str]:
    lines = [header, *(_line(k, v) for k, v in values.items() if not isinstance(v, dict))]
    for key, sub in values.items():
        if isinstance(sub, dict):
            lines += _table(f"[{header.strip('[]')}.{key}]", sub)
    return lines


def config_toml(raw: Mapping[str, Any]) -> str:
    """``raw`` as TOML: its tables (``broker``, ``store``, ...) and its ``[[accounts]]``."""
    lines: list[str] = []
    for key, value in raw.items():
        if key != "accounts":
            lines += _table(f"[{key}]", value)
    for account in raw.get("accounts", ()):
        lines.append("[[accounts]]")
        lines += [_line(k, v) for k, v in account.items() if not isinstance(v, dict)]
        for key, sub in account.items():
            if isinstance(sub, dict):
                lines += _table(f"[accounts.{key}]", sub)
    return "\n".join(lines) + "\n"
