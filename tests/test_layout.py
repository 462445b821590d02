"""The layout promises of docs/architecture.md that no linter checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_STDLIB_CHECK = (
    "import operator, collections, os; "
    "assert os.path.dirname(operator.__file__) == os.path.dirname(os.__file__), operator.__file__; "
    "print('ok', operator.eq(1, 1))"
)


def _run_python(code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONFLEET_")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(
    "flags", [["-S", "-m", "json.tool"], ["-S", "-c", _STDLIB_CHECK], ["-c", _STDLIB_CHECK]]
)
def test_stdlib_operator_is_not_shadowed_from_the_repository_root(flags: list[str]) -> None:
    # `-m` and `-c` put the working directory first on sys.path; `-S` skips site-packages, so nothing
    # imported the real module earlier (as on a fresh venv running `python -m pip` from here).
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONFLEET_")}
    done = subprocess.run(
        [sys.executable, *flags],
        cwd=REPO,
        env=env,
        input='{"ok": 1}',
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout


@pytest.mark.parametrize("module", ["captionfleet.operator", "captionfleet.cli", "captionfleet.settings"])
def test_the_operator_side_never_imports_torch_or_transformers(module: str) -> None:
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        "import captionfleet.cli as c; c.build_parser(only='operator'); "
        "print(sorted(m for m in ('torch', 'transformers', 'PIL') if m in sys.modules))"
    )
    assert _run_python(code, cwd=REPO).strip() == "[]"


def test_every_subcommand_has_help() -> None:
    from captionfleet.cli import SUBCOMMANDS, _available

    available = _available()
    for name in available:
        done = subprocess.run(
            [sys.executable, "-m", "captionfleet", name, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "CAPTIONFLEET_" in done.stdout or name == "bench", done.stdout
    assert set(available) <= set(SUBCOMMANDS)
