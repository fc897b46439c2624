"""The README stays honest: every `evoprune` command it (and `make demo`) shows parses with the real
command line, every bench script it names exists, and its test command is what CI runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from evoprune._cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _commands(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.strip().lstrip("\t")
        m = re.match(r"^(?:\$\(VENV\)|\.venv)/bin/evoprune\s+(.*)$", line)
        if m:
            out.append(m.group(1).split("  #")[0].strip())
    return out


README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
COMMANDS = _commands(README) + _commands(MAKEFILE)


def test_readme_shows_commands():
    assert len(_commands(README)) >= 8 and len(_commands(MAKEFILE)) >= 4


@pytest.mark.parametrize("command", COMMANDS)
def test_command_parses(command):
    args = build_parser().parse_args(shlex.split(command))
    assert callable(args.func)


def test_named_bench_scripts_exist_and_print_targets():
    named = {n for n in re.findall(r"bench/(\w+)\.py", README) if not n.isupper()}  # NAME: a placeholder
    assert named
    for name in named:
        source = (ROOT / "bench" / f"{name}.py").read_text()
        assert "TARGET " in source or "print_targets(" in source, name  # _common.print_targets writes them


def test_ci_runs_the_readme_test_command():
    assert "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    assert re.search(r"^test: .*\n\t\$\(PY\) -m pytest -q$", MAKEFILE, re.M)
