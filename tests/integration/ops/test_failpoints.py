"""Failpoints: parsed strictly, named in one list, and they end the process like a SIGKILL."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.ops import failpoints

ROOT = Path(__file__).resolve().parents[3]


def test_parse_exit_and_sleep() -> None:
    assert failpoints.parse("writer.after-commit, reconciler.after-commit=sleep:2.5") == {
        "writer.after-commit": None, "reconciler.after-commit": 2.5}
    assert failpoints.parse("") == {}


@pytest.mark.parametrize("spec", ["no.such.point", "writer.after-commit=crash",
                                  "writer.after-commit=sleep:x", "writer.after-commit=sleep:-1"])
def test_bad_spec_names_the_variable(spec: str) -> None:
    with pytest.raises(failpoints.FailpointError, match=failpoints.ENV):
        failpoints.parse(spec)


def _points_in_code() -> set[str]:
    names: set[str] = set()
    for path in [*(ROOT / "common").rglob("*.py"), *(ROOT / "services").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "reached" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                names.add(str(node.args[0].value))
    return names


def test_every_point_in_the_code_is_listed() -> None:
    assert _points_in_code() <= set(failpoints.POINTS)


def test_a_set_point_exits_137_and_an_unset_one_returns() -> None:
    code = ("import asyncio; from common.ops import failpoints; "
            "asyncio.run(failpoints.reached('reconciler.after-commit')); print('passed'); "
            "asyncio.run(failpoints.reached('writer.after-commit')); print('not reached')")
    env = {**os.environ, failpoints.ENV: "writer.after-commit"}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 137
    assert done.stdout.split() == ["passed"]
    assert "failpoint writer.after-commit" in done.stderr


def test_a_bad_setting_stops_the_command_naming_the_variable() -> None:
    env = {**os.environ, failpoints.ENV: "writer.after-comit"}
    done = subprocess.run([sys.executable, "-m", "services.cli", "run", "writer"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert f"bad config: {failpoints.ENV}: unknown failpoint 'writer.after-comit'" in done.stderr
    assert "Traceback" not in done.stderr
