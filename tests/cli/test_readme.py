"""The README and docs/ stay honest: every `evoprune` command they (and `make demo`) show parses with
the real command line, every bench script they name exists, every Python block compiles and names
only evoprune objects that exist, every YAML config fragment builds a StudyConfig, every link to a
doc file and heading resolves, the README's Python example runs, and its test command is what CI
runs."""

from __future__ import annotations

import ast
import importlib
import os
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


def _blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of one language (```lang ... ```)."""
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, re.M | re.S)


README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
DOCS = {p.relative_to(ROOT).as_posix(): p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
TEXTS = {"README.md": README, **DOCS}
COMMANDS = [c for text in TEXTS.values() for c in _commands(text)] + _commands(MAKEFILE)


def test_readme_shows_commands():
    assert len(_commands(README)) >= 8 and len(_commands(MAKEFILE)) >= 4
    assert {"cli.md", "config.md", "export.md", "storage.md", "results.md", "architecture.md"} <= {
        Path(name).name for name in DOCS
    }
    assert len([c for name in DOCS for c in _commands(DOCS[name])]) >= 20


@pytest.mark.parametrize("command", COMMANDS)
def test_command_parses(command):
    args = build_parser().parse_args(shlex.split(command))
    assert callable(args.func)


def test_every_cli_verb_is_documented():
    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "command").choices
    shown = {c.split()[0] for c in _commands(DOCS["docs/cli.md"])}
    table = {m for m in re.findall(r"^\| `([a-z-]+)", DOCS["docs/cli.md"], re.M)}
    assert set(verbs) <= shown | table, sorted(set(verbs) - shown - table)


def test_named_bench_scripts_exist_and_print_targets():
    named = {n for text in TEXTS.values() for n in re.findall(r"bench/(\w+)\.py", text) if not n.isupper()}  # NAME: a placeholder
    assert named
    for name in named:
        source = (ROOT / "bench" / f"{name}.py").read_text()
        assert "TARGET " in source or "print_targets(" in source, name  # _common.print_targets writes them


def test_named_scripts_exist():
    for text in TEXTS.values():
        for path in re.findall(r"\.venv/bin/python (studies/\w+\.py)", text):
            assert (ROOT / path).is_file(), path


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_links_to_docs_resolve():
    checked = 0
    for name, text in TEXTS.items():
        base = (ROOT / name).parent
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (base / path).resolve() if path else (ROOT / name)
            assert file.is_file(), f"{name}: link to {target}"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", file.read_text(), re.M)
                assert anchor in {_slug(h) for h in headings}, f"{name}: no heading for {target}"
            checked += 1
    assert checked >= 20


def _check_evoprune_names(source: str, where: str) -> None:
    """Imports of evoprune resolve, and every attribute read from an imported evoprune object exists."""
    tree = ast.parse(source)
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "evoprune":
                    module = importlib.import_module(alias.name)
                    names[alias.asname or alias.name.split(".")[0]] = (
                        module if alias.asname else importlib.import_module("evoprune"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "evoprune":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name) and hasattr(module, "__path__"):  # `from evoprune import report`
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        pass
                assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)

    def resolve(node: ast.AST) -> object | None:
        if isinstance(node, ast.Name):
            return names.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = resolve(node.value)
            if owner is None:
                return None
            if not hasattr(owner, node.attr) and hasattr(owner, "__path__"):  # a subpackage not imported yet
                try:
                    importlib.import_module(f"{owner.__name__}.{node.attr}")
                except ImportError:
                    pass
            assert hasattr(owner, node.attr), f"{where}: {getattr(owner, '__name__', owner)} has no {node.attr}"
            return getattr(owner, node.attr)
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            resolve(node)


PYTHON_BLOCKS = [(name, i, block) for name, text in TEXTS.items() for i, block in enumerate(_blocks(text, "python"))]


@pytest.mark.parametrize(("name", "index", "block"), PYTHON_BLOCKS, ids=[f"{n}-{i}" for n, i, _ in PYTHON_BLOCKS])
def test_python_block_compiles_and_names_exist(name, index, block):
    _check_evoprune_names(block, f"{name} python block {index}")


def test_python_one_liners_compile():
    lines = [m for text in TEXTS.values() for m in re.findall(r'\.venv/bin/python -c "(.*)"', text)]
    assert lines
    for code in lines:
        _check_evoprune_names(code, code)


def test_yaml_config_fragments_build():
    import yaml

    from evoprune.search import StudyConfig

    keys = {f for f in StudyConfig.__dataclass_fields__} | {"preset"}
    built = 0
    for name, text in TEXTS.items():
        for block in _blocks(text, "yaml"):
            data = yaml.safe_load(block)
            assert isinstance(data, dict), f"{name}: {block}"
            assert set(data) <= keys, f"{name}: unknown config keys {sorted(set(data) - keys)}"
            StudyConfig.from_dict(data)
            built += 1
    assert built >= 2


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, reference_tiny, capsys):
    """The README's Python example, exactly as shown, in an empty folder (reference:tiny is built)."""
    (block,) = _blocks(README, "python")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    namespace: dict[str, object] = {}
    try:
        exec(compile(block, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
        if "study" in namespace:
            namespace["study"].close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[ParetoPoint(number=")
    assert out[1] == str(tmp_path / "out" / "readme-report.html")
    assert (tmp_path / "out" / "readme-report.html").stat().st_size > 100_000
    assert (tmp_path / "out" / "readme-best" / "config.json").is_file()


def test_ci_runs_the_readme_test_command():
    assert "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    assert re.search(r"^test: .*\n\t\$\(PY\) -m pytest -q$", MAKEFILE, re.M)
