"""The package layout's import rules, read from the source with ``ast`` (nothing is imported).

1. Each of the four services (``services/dynamics_poller``, ``ec_poller``, ``reconciler``,
   ``writer``) imports no other package of ``services/``: what two of them share lives in
   ``common/``.
2. ``services/runtime`` starts the services, so it may import them, but never a command
   (``services/cli``).
3. ``common/`` never imports ``services/``.
4. The simulators (``services/simulators``) import nothing from ``common/`` or from the rest of
   ``services/``: they stand in for the vendors, and know nothing of prefsync.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("dynamics_poller", "ec_poller", "reconciler", "writer")


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path, *, module: str | None = None) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in the file (``module``: its name, by default from its
    path), function-level ones included; relative imports resolved; ``from package import
    module`` gives the module."""
    package = (module or _module_of(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *filter(None, [base])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield node.lineno, candidate if _exists(candidate) else base


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(package: str, allowed: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """Imports from the files of ``package`` that reach into ``forbidden`` (but not into one
    of ``allowed``, which are checked first)."""
    found = []
    for path in sorted(ROOT.joinpath(*package.split(".")).rglob("*.py")):
        for line, module in imports_of(path):
            if any(_within(module, a) for a in allowed):
                continue
            if any(_within(module, f) for f in forbidden):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return list(dict.fromkeys(found))


def test_the_packages_exist() -> None:
    # a rule over a package that is not there would pass for nothing
    for package in (*(f"services.{s}" for s in SERVICES), "services.runtime", "services.cli",
                    "services.simulators", "common"):
        assert _exists(package), package


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_part_of_services(service: str) -> None:
    assert violations(f"services.{service}", allowed=(f"services.{service}",),
                      forbidden=("services",)) == []


def test_the_runtime_imports_no_command() -> None:
    assert violations("services.runtime", allowed=(),
                      forbidden=("services.cli", "services.simulators")) == []


def test_common_never_imports_services() -> None:
    assert violations("common", allowed=(), forbidden=("services",)) == []


def test_simulators_import_nothing_of_prefsync() -> None:
    assert violations("services.simulators", allowed=("services.simulators",),
                      forbidden=("services", "common")) == []


def test_the_rules_see_every_form_of_import(tmp_path: Path) -> None:
    """The checker itself: absolute, from-package, relative and function-level imports."""
    source = ("import services.cli.main\n"
              "from services.cli import prefs\n"
              "from .service import Writer\n"
              "def later() -> None:\n"
              "    from common.messaging import amqp\n")
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    found = dict(imports_of(probe, module="services.writer.probe"))
    assert found == {1: "services.cli.main", 2: "services.cli.prefs",
                     3: "services.writer.service", 5: "common.messaging.amqp"}
