"""Personal data: erasure, retention and API access. Ledger tests run on both backends, with
the store tests' own fixtures."""

from __future__ import annotations

from ..store.conftest import backend, store, url

__all__ = ["backend", "store", "url"]
