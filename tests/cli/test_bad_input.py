"""Bad input, one catalog: every case runs the real CLI (``evoprune._cli.main`` in-process) and must

* exit non-zero, with exactly one ``evoprune: error: ...`` line that says what to do,
* print no traceback (``--debug`` does) and never a password,
* leave the study database row-identical (a dump of every table before and after; no study,
  worker or claim row) -- and create no database, file or folder where there was none.

Most cases run on SQLite; a few on PostgreSQL / MariaDB (skipped with the reason when no server
answers). Expensive setup (a study with one trial, model folders, data files) is module-scoped.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from helpers import dump, tiny_text_config as tiny_config
from helpers import server_database as _server_database

from evoprune._cli import main

PASSWORD = "s3cr3t-pw"
TEXT = (
    "The quick brown fox jumps over the lazy dog. Shall I compare thee to a summer's day? "
    "Thou art more lovely and more temperate. Rough winds do shake the darling buds of May. "
)


# --------------------------------------------------------------------------- dumps


# --------------------------------------------------------------------------- module setup


@dataclasses.dataclass
class World:
    root: Path
    data: Path
    db: str  # SQLite URL with study "s" (1 complete trial, exported) and plain Optuna study "plain"
    model_copy: Path  # a copy of reference:tiny used by study "m" (its weights are changed by a case)
    data_d: Path  # text data of study "d" (changed by a case)
    ref: Path
    other_tok: Path  # a tokenizer with ids beyond the model's vocabulary
    export_dir: Path  # an export of trial 0 of study "s"

    def write(self, name: str, cfg: Any) -> str:
        path = self.root / "configs" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg), encoding="utf-8")
        return str(path)


def _other_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: 5000 + i for i, w in enumerate(sorted(set(TEXT.lower().split())))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, reference_tiny) -> World:
    import optuna

    from evoprune.study import create_study

    root = tmp_path_factory.mktemp("bad_input")
    data = root / "data"
    data.mkdir()
    (data / "train.txt").write_text(TEXT * 8, encoding="utf-8")
    (data / "valid.txt").write_text(TEXT * 8, encoding="utf-8")
    (data / "short.txt").write_text("Too short.", encoding="utf-8")
    (data / "empty.txt").write_text("", encoding="utf-8")
    data_d = root / "data_d"
    shutil.copytree(data, data_d)
    model_copy = root / "model_copy"
    shutil.copytree(reference_tiny, model_copy)
    url = f"sqlite:///{root / 'study.db'}"
    with create_study(tiny_config(data), storage=url, study_name="s", runtime=True) as study:
        study.run(n_trials=1)
        export_dir = root / "export0"
        study.export(0, export_dir)
    create_study(tiny_config(data, model=str(model_copy)), storage=url, study_name="m", runtime=True).close()
    create_study(tiny_config(data_d), storage=url, study_name="d", runtime=True).close()
    optuna.create_study(storage=url, study_name="plain")
    optuna.delete_study(study_name="plain", storage=url)  # a deleted study's id is taken again below
    optuna.create_study(storage=url, study_name="plain")
    return World(root=root, data=data, db=url, model_copy=model_copy, data_d=data_d, ref=Path(reference_tiny),
                 other_tok=_other_tokenizer(root / "other_tok"), export_dir=export_dir)


@pytest.fixture(scope="module")
def servers(world):
    """``{"postgresql": (empty_url, study_url), "mysql": ...}`` for the servers that answer."""
    from evoprune.study import create_study

    out, drops, skipped = {}, [], {}
    for kind in ("postgresql", "mysql"):
        try:
            empty, drop_empty = _server_database(kind)
            full, drop_full = _server_database(kind)
        except pytest.skip.Exception as exc:
            skipped[kind] = str(exc)
            continue
        drops += [drop_empty, drop_full]
        create_study(tiny_config(world.data), storage=full, study_name="s", runtime=True).close()  # started
        out[kind] = (empty, full)
    yield out, skipped
    for drop in drops:
        drop()


# --------------------------------------------------------------------------- the catalog
# Each case: (id, setup(world) -> (argv, url of the database that must not change), exit code, words
# the message must contain). A setup may change files (it runs right before its case).

Case = tuple[str, Callable[[World], tuple[list[str], str]], int, tuple[str, ...]]


def _search(cfg_name: str, cfg: Callable[[World], Any], *extra: str, study: str = "new") -> Callable:
    def setup(w: World) -> tuple[list[str], str]:
        return ["search", w.write(cfg_name, cfg(w)), "--storage", w.db, "--study", study, *extra], w.db
    return setup


def _cfg(**changes: Any) -> Callable[[World], dict[str, Any]]:
    return lambda w: tiny_config(w.data, **{k: (v(w) if callable(v) else v) for k, v in changes.items()})


def _on_db(*argv: str) -> Callable:
    return lambda w: ([a.replace("{db}", w.db).replace("{root}", str(w.root)) for a in argv], w.db)


def _stage(**changes: Any) -> list[dict[str, Any]]:
    return [{"name": "final", "evaluators": ["kl"], "eval_tokens": 64, "seq_len": 32, **changes}]


def _model_folder(kind: str) -> Callable[[World], str]:
    def make(w: World) -> str:
        folder = w.root / f"model_{kind}"
        if folder.exists():
            return str(folder)
        folder.mkdir()
        if kind == "corrupt":
            (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ', encoding="utf-8")
        elif kind == "gpt2":
            from transformers import GPT2Config

            GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=768).to_json_file(folder / "config.json")
        return str(folder)
    return make


def _change_model_weights(w: World) -> tuple[list[str], str]:
    import torch
    from safetensors.torch import load_file, save_file

    path = w.model_copy / "model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01 * torch.ones_like(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})
    return ["resume", "--storage", w.db, "--study", "m", "--n-trials", "1"], w.db


def _change_data(w: World) -> tuple[list[str], str]:
    (w.data_d / "valid.txt").write_text(TEXT * 9, encoding="utf-8")
    return ["resume", "--storage", w.db, "--study", "d", "--n-trials", "1"], w.db


def _edited_export(w: World) -> tuple[list[str], str]:
    cfg = w.export_dir / "config.json"
    cfg.write_text(cfg.read_text(encoding="utf-8").replace('"hidden_act": "silu"', '"hidden_act": "gelu"'))
    return ["export", "--storage", w.db, "--study", "s", "--trial", "0", "--out", str(w.export_dir)], w.db


def _data_file(w: World, name: str) -> str:
    """A bad data file in ``w.data``: latin-1 text, or a token file with an id beyond any vocabulary."""
    path = w.data / name
    if name.endswith(".npy"):
        import numpy as np

        np.save(path, np.array([1, 2, 10**6] * 200, dtype=np.int64))
    else:
        path.write_bytes("Caf\xe9 au lait. ".encode("latin-1") * 200)
    return str(path)


def _missing(name: str, *argv: str) -> Callable:
    def setup(w: World) -> tuple[list[str], str]:
        url = f"sqlite:///{w.root / 'missing' / name}"
        return [a.replace("{url}", url) for a in argv], url
    return setup


CASES: list[Case] = [
    # ---- the config file itself
    ("yaml-malformed", lambda w: (["search", w.write("bad.yaml", "model: reference:tiny\nstages: [\n"),
                                   "--storage", w.db], w.db), 1, ("not valid YAML", "line")),
    ("json-malformed", lambda w: (["search", w.write("bad.json", '{"model": '), "--storage", w.db], w.db),
     1, ("not valid JSON",)),
    ("config-missing", _on_db("search", "{root}/nope.yaml", "--storage", "{db}"), 2, ("does not exist",)),
    ("config-not-mapping", _search("list.yaml", lambda w: [1, 2]), 1, ("mapping",)),
    ("unknown-top-level-key", _search("k1.yaml", _cfg(modle="x")), 1, ("unknown keys", "modle")),
    ("unknown-nested-key", _search("k2.yaml", _cfg(calibration={"num_sequences": 2, "seq_len": 32, "size": 3})),
     1, ("calibration", "size")),
    ("unknown-stage-key", _search("k3.yaml", _cfg(stages=_stage(tokens=5))), 1, ("unknown keys", "tokens")),
    ("unknown-space-option", _search("k4.yaml", _cfg(space={"heads": 2})), 1, ("space", "heads")),
    ("wrong-type-seed", _search("t1.yaml", _cfg(seed="abc")), 1, ("seed",)),
    ("wrong-type-calibration", _search("t2.yaml", _cfg(calibration=5)), 1, ("calibration", "mapping")),
    ("wrong-type-stages", _search("t5.yaml", _cfg(stages=5)), 1, ("stages", "list")),
    ("wrong-type-space", _search("t6.yaml", _cfg(space=[1, 2])), 1, ("space", "mapping")),
    ("wrong-type-objectives", _search("t7.yaml", _cfg(objectives=3)), 1, ("objectives",)),
    ("wrong-type-eval-tokens", _search("t3.yaml", _cfg(stages=_stage(eval_tokens="many"))), 1, ("eval_tokens",)),
    ("unknown-sampler", _search("t4.yaml", _cfg(sampler={"name": "annealing"})), 1, ("sampler.name",)),
    ("budget-max-ratio-1.5", _search("b1.yaml", _cfg(budget={"metric": "params", "max_ratio": 1.5})),
     1, ("max_ratio", "(0, 1]")),
    ("budget-negative", _search("b2.yaml", _cfg(budget={"metric": "params", "max_ratio": -0.2})), 1, ("max_ratio",)),
    ("budget-no-metric", _search("b3.yaml", _cfg(budget={"max_ratio": 0.5})), 1, ("metric",)),
    ("budget-unknown-metric", _search("b4.yaml", _cfg(budget={"metric": "weight", "max_ratio": 0.5})),
     1, ("metric",)),
    ("eval-tokens-0", _search("e0.yaml", _cfg(stages=_stage(eval_tokens=0))), 1, ("eval_tokens", ">= 1")),
    ("calibration-no-seq-len", _search("c0.yaml", _cfg(calibration={"num_sequences": 2})), 1, ("seq_len",)),
    ("objective-unknown", _search("o1.yaml", _cfg(objectives=["accuracy"])), 1, ("objectives",)),
    # ---- stop conditions
    # a sampler without a stop rule of its own (the evolutionary one stops by itself: issue 27)
    ("no-stop-condition", _search("ns.yaml", _cfg(stop={}, sampler={"name": "tpe"})), 1,
     ("no stop condition", "--max-tokens")),
    ("generations-0", _search("g0.yaml", _cfg(), "--generations", "0"), 2, ("--generations", ">= 1")),
    ("n-trials-negative", _search("g1.yaml", _cfg(), "--n-trials", "-3"), 2, ("--n-trials",)),
    ("timeout-0", _search("g2.yaml", _cfg(), "--timeout", "0"), 2, ("--timeout",)),
    ("config-stop-0", _search("g3.yaml", _cfg(stop={"n_generations": 0})), 1, ("n_generations",)),
    # ---- model, space and budget (checked before a row is written)
    ("sparsity-negative", _search("sp1.yaml", _cfg(space={"attention": None, "sparsity_levels": [0.0, -0.1]})),
     1, ("sparsity_levels",)),
    ("sparsity-ge-1", _search("sp2.yaml", _cfg(space={"attention": None, "sparsity_levels": [0.0, 1.0]})),
     1, ("sparsity_levels",)),
    ("budget-unreachable", _search("b5.yaml", _cfg(budget={"metric": "params", "max_ratio": 0.01})),
     1, ("cannot be met",)),
    ("width-does-not-divide", _search("w1.yaml", _cfg(space={"attention": None, "mlp_step": 7})), 1, ("mlp_step",)),
    ("model-folder-missing", _search("m1.yaml", _cfg(model=lambda w: str(w.root / "no_such_model"))),
     2, ("does not exist",)),
    ("model-config-corrupt", _search("m2.yaml", _cfg(model=_model_folder("corrupt"))), 1, ("config.json", "JSON")),
    ("model-folder-empty", _search("m3.yaml", _cfg(model=_model_folder("empty"))), 2, ("config.json",)),
    ("unsupported-architecture", _search("m4.yaml", _cfg(model=_model_folder("gpt2"))), 1, ("gpt2",)),
    ("seq-len-over-positions", _search("m5.yaml", _cfg(calibration={"num_sequences": 2, "seq_len": 4096})),
     1, ("max_position_embeddings",)),
    ("stage-seq-len-over-positions", _search("m6.yaml", _cfg(stages=_stage(seq_len=1024, eval_tokens=2048))),
     1, ("max_position_embeddings",)),
    ("tokenizer-model-mismatch", _search("m7.yaml", _cfg(tokenizer=lambda w: str(w.other_tok))),
     1, ("tokenizer", "do not match")),
    # ---- data
    ("data-file-empty", _search("d1.yaml", _cfg(data=lambda w: {"source": "text", "train": [str(w.data / "train.txt")],
                                                               "validation": [str(w.data / "empty.txt")]})),
     1, ("validation data",)),
    ("data-too-short", _search("d2.yaml", _cfg(data=lambda w: {"source": "text", "train": [str(w.data / "short.txt")],
                                                              "validation": [str(w.data / "valid.txt")]})),
     1, ("calibration", "add calibration text")),
    ("data-file-missing", _search("d3.yaml", _cfg(data=lambda w: {"source": "text", "train": [str(w.data / "x.txt")],
                                                                 "validation": [str(w.data / "valid.txt")]})),
     2, ("x.txt",)),
    ("data-not-utf8", _search("d4.yaml", _cfg(data=lambda w: {"source": "text", "train": [str(w.data / "train.txt")],
                                                             "validation": [_data_file(w, "latin1.txt")]})),
     1, ("latin1.txt", "not UTF-8 text", "token file")),
    ("token-file-over-vocab", _search("d5.yaml", _cfg(data=lambda w: {
        "source": "text", "train": [str(w.data / "train.txt")], "validation": [_data_file(w, "big_ids.npy")]})),
     1, ("big_ids.npy", "token id 1000000", "vocabulary")),
    ("windows-overlap", _search("d6.yaml", _cfg(data=lambda w: {
        "source": "text", "train": [str(w.data / "train.txt")], "validation": [str(w.data / "valid.txt")],
        "windows": [0, 16]})), 1, ("data.windows", "overlap")),
    # ---- an existing study of that name
    ("two-configs-one-name", _search("s2.yaml", _cfg(seed=7), study="s"), 1, ("different config", "resume")),
    ("other-objectives-one-name", _search("s3.yaml", _cfg(objectives=["kl"]), study="s"), 1, ("directions",)),
    ("plain-optuna-study", _search("s4.yaml", _cfg(), study="plain"), 1, ("plain Optuna study",)),
    ("show-plain-optuna-study", _on_db("show", "--storage", "{db}", "--study", "plain"), 1, ("plain Optuna",)),
    ("resume-changed-model", _change_model_weights, 3, ("model fingerprint changed",)),
    ("resume-changed-data", _change_data, 3, ("fingerprint changed",)),
    ("resume-generations-0", _on_db("resume", "--storage", "{db}", "--study", "s", "--generations", "0"),
     2, ("--generations",)),
    # ---- storage URLs
    ("storage-is-yaml", lambda w: (["search", w.write("ok.yaml", tiny_config(w.data)), "--storage",
                                    w.write("other.yaml", {"a": 1})], w.db), 1, ("not a SQLite database",)),
    ("storage-is-folder", lambda w: (["search", w.write("ok.yaml", tiny_config(w.data)), "--storage",
                                      str(w.root / "data")], w.db), 1, ("is a folder",)),
    ("studies-typo-path", _missing("typo/x.db", "studies", "--storage", "{url}"), 2, ("no study database",)),
    ("show-missing-sqlite", _missing("a.db", "show", "--storage", "{url}", "--study", "s"), 2, ("no study database",)),
    ("check-missing-sqlite", _missing("b.db", "check", "--storage", "{url}", "--study", "s"), 2,
     ("no study database",)),
    ("resume-missing-sqlite", _missing("c.db", "resume", "--storage", "{url}", "--study", "s", "--n-trials", "1"),
     2, ("no study database",)),
    ("worker-missing-sqlite", _missing("d.db", "worker", "--storage", "{url}", "--study", "s", "--n-trials", "1"),
     2, ("no study database",)),
    ("export-missing-sqlite", _missing("e.db", "export", "--storage", "{url}", "--study", "s", "--trial", "0",
                                       "--out", "/nonexistent/out"), 2, ("no study database",)),
    ("delete-missing-sqlite", _missing("f.db", "delete-study", "--storage", "{url}", "--study", "s", "--yes"),
     2, ("no study database",)),
    ("unknown-scheme", _on_db("studies", "--storage", "mongodb://localhost/x"), 1, ("unsupported storage URL",)),
    ("url-with-password-refused", lambda w: (["search", w.write("ok.yaml", tiny_config(w.data)), "--storage",
                                              f"postgresql://evo:{PASSWORD}@127.0.0.1:1/evo"], w.db),
     1, ("cannot open", "***")),
    ("url-with-password-no-host", _on_db("show", "--storage", "mysql://evo:" + PASSWORD + "@no-such-host.invalid/evo",
                                         "--study", "s"), 1, ("resolve", "mysql+pymysql://", "***")),
    # ---- studies, trials and exports
    ("show-unknown-study", _on_db("show", "--storage", "{db}", "--study", "nope"), 2, ("no study named", "studies")),
    ("delete-unknown-study", _on_db("delete-study", "--storage", "{db}", "--study", "nope", "--yes"),
     2, ("no study named",)),
    ("delete-without-yes", _on_db("delete-study", "--storage", "{db}", "--study", "s"), 1, ("--yes",)),
    ("trial-999", _on_db("export", "--storage", "{db}", "--study", "s", "--trial", "999", "--out", "{root}/x999"),
     1, ("no trial 999", "evoprune show")),
    ("trial-not-a-number", _on_db("export", "--storage", "{db}", "--study", "s", "--trial", "abc", "--out",
                                  "{root}/xabc"), 2, ("--trial",)),
    ("export-folder-exists", _on_db("export", "--storage", "{db}", "--study", "s", "--trial", "0", "--out",
                                    "{root}/data"), 1, ("not an empty folder", "--out")),
    ("export-out-is-a-file", _on_db("export", "--storage", "{db}", "--study", "s", "--trial", "0", "--out",
                                    "{root}/data/train.txt"), 1, ("--out",)),
    ("export-folder-edited-by-hand", _edited_export, 1, ("not an empty folder",)),
    ("export-dtype-without-gguf", _on_db("export", "--storage", "{db}", "--study", "s", "--trial", "0", "--out",
                                         "{root}/xdtype", "--dtype", "f16"), 1, ("--dtype", "--format gguf")),
    ("verify-export-not-an-export", _on_db("verify-export", "{root}/data"), 2, ("config.json", "--format gguf")),
    ("verify-export-missing", _on_db("verify-export", "{root}/nowhere.gguf"), 2, ("does not exist",)),
]


def _check(capsys, argv: list[str], url: str, code: int, words: tuple[str, ...], *, created: bool = False) -> str:
    before = dump(url)
    assert main(argv) == code, capsys.readouterr().err
    captured = capsys.readouterr()
    text = captured.out + captured.err
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("evoprune: error:")]
    assert len(errors) == 1, captured.err
    assert "Traceback" not in text
    assert PASSWORD not in text
    for word in words:
        assert word in errors[0], errors[0]
    assert dump(url) == before, "the database changed"
    if before is None and url.startswith("sqlite"):
        path = Path(sa.engine.make_url(url).database)
        assert not path.exists() and not path.parent.exists(), f"{path} (or its folder) was created"
    return errors[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, capsys, case):
    _, setup, code, words = case
    argv, url = setup(world)
    _check(capsys, argv, url, code, words)


# --------------------------------------------------------------------------- servers


def test_server_bad_input(world, servers, capsys):
    """PostgreSQL / MariaDB: refused connection, unknown host, missing database, a password in the
    URL, read-only commands on an empty database (no table created), a second config under one name."""
    import optuna

    found, skipped = servers
    if not found:
        pytest.skip("; ".join(skipped.values()))
    cfg = world.write("srv.yaml", tiny_config(world.data))
    other = world.write("srv2.yaml", tiny_config(world.data, seed=9))
    for kind, (empty, full) in found.items():
        u = sa.engine.make_url(full)
        refused = u.set(port=1, password=PASSWORD).render_as_string(hide_password=False)
        no_host = u.set(host="no-such-host.invalid", password=PASSWORD).render_as_string(hide_password=False)
        no_db = u.set(database="evoprune_no_such_db").render_as_string(hide_password=False)
        rows: list[tuple[list[str], str, int, tuple[str, ...]]] = [
            (["studies", "--storage", refused], full, 1, ("cannot open", "***")),
            (["search", cfg, "--storage", refused, "--study", "x"], full, 1, ("cannot open",)),
            (["show", "--storage", no_host, "--study", "s"], full, 1, ("resolve",)),
            (["show", "--storage", no_db, "--study", "s"], full, 1, ("evoprune_no_such_db", "CREATE DATABASE")),
            (["show", "--storage", empty, "--study", "s"], empty, 2, ("no Optuna tables",)),
            (["studies", "--storage", empty], empty, 2, ("no Optuna tables",)),
            (["resume", "--storage", empty, "--study", "s", "--n-trials", "1"], empty, 2, ("no Optuna tables",)),
            (["delete-study", "--storage", empty, "--study", "s", "--yes"], empty, 2, ("no Optuna tables",)),
            (["search", other, "--storage", full, "--study", "s"], full, 1, ("different config",)),
            (["search", world.write("srv3.yaml", tiny_config(world.data, model=str(world.root / "gone"))),
              "--storage", empty, "--study", "x"], empty, 2, ("does not exist",)),
        ]
        for argv, url, code, words in rows:
            _check(capsys, argv, url, code, words)
        assert dump(empty) == {}, f"{kind}: a read-only command created tables"
        # a plain mysql:// or postgresql:// URL is printed in the form optuna.load_study accepts
        plain = full.replace("+pymysql", "").replace("+psycopg", "")
        assert main(["show", "--storage", plain, "--study", "s"]) == 0
        printed = capsys.readouterr().out.splitlines()[0].split(" in ", 1)[1]
        assert "+" in printed.split("://")[0]
        assert optuna.load_study(study_name="s", storage=printed).study_name == "s"


# --------------------------------------------------------------------------- what works after an error


def test_debug_shows_the_traceback(world, capsys):
    argv = ["--debug", "search", world.write("dbg.yaml", tiny_config(world.data, budget={"metric": "params",
                                                                                       "max_ratio": 1.5})),
            "--storage", world.db]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("evoprune: error:")
    assert main(["studies", "--storage", f"postgresql://evo:{PASSWORD}@127.0.0.1:1/evo", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and PASSWORD not in err


def test_failed_start_leaves_the_name_free_and_delete_study(world, tmp_path, capsys):
    """B4: a start that fails on the model leaves no row, so the fixed config starts under the same
    name; B5/delete-study: a study deleted with plain Optuna leaves evoprune rows that a new study of
    the same id never picks up, and `evoprune delete-study` removes both."""
    import optuna

    from evoprune.study import load_study
    from evoprune.storage import list_studies

    url = f"sqlite:///{tmp_path / 'life.db'}"
    bad = world.write("life_bad.yaml", tiny_config(world.data, model=str(world.root / "gone")))
    good = world.write("life.yaml", tiny_config(world.data))
    assert main(["search", bad, "--storage", url, "--study", "life"]) == 2
    assert dump(url) is None
    capsys.readouterr()
    assert main(["search", good, "--storage", url, "--study", "life"]) == 0
    with load_study(storage=url, study_name="life") as study:
        assert len(study.trials()) == 1 and study.sampler_state() is not None
    # plain Optuna deletes it; SQLite gives the next study the same id (and its trials the same ids)
    optuna.delete_study(study_name="life", storage=url)
    optuna.create_study(study_name="intruder", storage=url)  # plain, with the deleted study's id
    capsys.readouterr()
    _check(capsys, ["show", "--storage", url, "--study", "intruder"], url, 1, ("no evoprune config",))
    assert {r["name"]: r["evoprune"] for r in list_studies(url)} == {"intruder": False}
    assert main(["search", good, "--storage", url, "--study", "life2"]) == 0  # reuses trial id 1: no clash
    optuna.delete_study(study_name="intruder", storage=url)
    assert main(["search", good, "--storage", url, "--study", "life"]) == 0  # study id 1 again, starts clean
    for name in ("life", "life2"):
        with load_study(storage=url, study_name=name) as study:
            assert len(study.trials()) == 1 and study.check() == [] and study.artifacts() == []
            assert study.sampler_state()[0] == 1
    assert main(["delete-study", "--storage", url, "--study", "life", "--yes"]) == 0
    capsys.readouterr()
    assert main(["delete-study", "--storage", url, "--study", "life2", "--yes"]) == 0
    assert "deleted study 'life2' (1 trials)" in capsys.readouterr().out
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        for table in sa.inspect(conn).get_table_names():
            if table.startswith("evoprune_") and table not in ("evoprune_schema_version", "evoprune_alembic_version"):
                assert conn.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar() == 0, table
        assert conn.execute(sa.text("SELECT COUNT(*) FROM studies")).scalar() == 0
    engine.dispose()
    assert main(["search", good, "--storage", url, "--study", "life2"]) == 0  # the name is free again


def test_fixture_reuses_a_deleted_study_id(world):
    """The module's "plain" study took the id of a deleted one (the B5 setting) and is still plain."""
    import optuna

    from evoprune.storage import list_studies

    rows = {r["name"]: r for r in list_studies(world.db)}
    assert rows["plain"]["evoprune"] is False and rows["s"]["evoprune"] is True
    assert json.loads(json.dumps(rows["s"]["trials"])) == {"COMPLETE": 1}
    assert optuna.load_study(study_name="s", storage=world.db).trials[0].state.name == "COMPLETE"


def test_python_path_failed_first_run_frees_the_name(world, tmp_path):
    """Python: ``create_study(..., runtime=True)`` writes nothing when the model is missing; a study
    created without a runtime whose first ``run`` fails never started, so the fixed config takes it."""
    from evoprune.search import StudyConfig
    from evoprune.study import create_study
    from evoprune.storage import ConfigMismatchError

    url = f"sqlite:///{tmp_path / 'py.db'}"
    bad = StudyConfig.from_dict(tiny_config(world.data, model=str(world.root / "gone"), stop={},
                                            sampler={"name": "evolutionary", "options": {"patience": None}}))
    good = StudyConfig.from_dict(tiny_config(world.data))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_study(bad, storage=url, study_name="py", runtime=True)
    assert dump(url) is None
    study = create_study(bad, storage=url, study_name="py")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        study.run(n_trials=1)
    with pytest.raises(ValueError, match="no stop condition"):
        study.run()
    study.close()
    with create_study(good, storage=url, study_name="py") as study:
        assert study.config == good
        study.run(n_trials=1)
    with pytest.raises(ConfigMismatchError, match="different config"):
        create_study(bad, storage=url, study_name="py")  # now it has started: its config is fixed


# --------------------------------------------------------------------------- issue 23: the inputs that still escaped


def _mismatched_weights(w: World) -> str:
    """A copy of the reference model whose config.json says twice the MLP width its weights have."""
    folder = w.root / "model_mismatch"
    if not folder.exists():
        shutil.copytree(w.ref, folder)
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        cfg["intermediate_size"] *= 2
        (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return str(folder)


_RESUME = ("resume", "--storage", "{db}", "--study", "s", "--n-trials", "1")
_EXPORT = ("export", "--storage", "{db}", "--study", "s", "--trial", "0")

CASES_23: list[Case] = [
    # bad flag values: exit 2 (the README's rule), before anything is opened
    ("heartbeat-inf", _on_db(*_RESUME, "--heartbeat", "inf"), 2, ("--heartbeat", "finite")),
    ("threads-100000", _on_db(*_RESUME, "--threads", "100000"), 2, ("--threads", "100000")),
    ("log-level-bogus", _on_db("--log-level", "BOGUS", "studies", "--storage", "{db}"), 2, ("--log-level", "BOGUS")),
    ("export-out-folder-missing", _on_db(*_EXPORT, "--out", "{root}/no/such/folder/out"), 2,
     ("--out", "does not exist")),
    ("report-out-folder-missing", _on_db("report", "--storage", "{db}", "--study", "s", "--out",
                                         "{root}/no/such/report.html"), 2, ("--out", "does not exist")),
    ("storage-in-memory", lambda w: (["search", w.write("ok.yaml", tiny_config(w.data)), "--storage", "sqlite://"],
                                     w.db), 2, ("in-memory", "sqlite:///")),
    ("storage-in-memory-resume", _on_db("resume", "--storage", "sqlite:///:memory:", "--study", "s"), 2,
     ("in-memory",)),
    ("study-name-600-chars", _search("long.yaml", _cfg(), study="x" * 600), 2, ("--study", "512")),
    ("study-name-empty", _on_db(*_RESUME[:4], "", "--n-trials", "1"), 2, ("--study",)),
    ("finetune-lr-nan", _on_db(*_EXPORT, "--out", "{root}/xnan", "--finetune-tokens", "64", "--finetune-lr", "nan"),
     2, ("--finetune-lr", "finite")),
    ("finetune-lr-without-tokens", _on_db(*_EXPORT, "--out", "{root}/xlr", "--finetune-lr", "0.001"), 2,
     ("--finetune-tokens",)),
    ("finetune-loss-without-tokens", _on_db(*_EXPORT, "--out", "{root}/xkl", "--finetune-loss", "kl"), 2,
     ("--finetune-loss", "--finetune-tokens")),
    ("finetune-temperature-with-ce", _on_db(*_EXPORT, "--out", "{root}/xt", "--finetune-tokens", "64",
                                            "--finetune-temperature", "2"), 2, ("--finetune-temperature", "kl")),
    ("status-grace-negative", _on_db("status", "--storage", "{db}", "--study", "s", "--grace", "-1"), 2, ("--grace",)),
    ("check-grace-zero", _on_db("check", "--storage", "{db}", "--study", "s", "--grace", "0"), 2, ("--grace",)),
    ("grace-below-heartbeat", _on_db(*_RESUME, "--heartbeat", "5", "--grace", "2"), 2, ("--grace", "--heartbeat")),
    ("timeout-inf", _on_db(*_RESUME, "--timeout", "inf"), 2, ("--timeout", "finite")),
    ("verify-tolerance-nan", _on_db("verify-export", "{root}/data", "--tolerance", "nan"), 2, ("--tolerance",)),
    # config content: exit 1
    ("unknown-sampler-option", _search("so.yaml", _cfg(sampler={"name": "evolutionary",
                                                                "options": {"offspring": 2, "bogus": 1}})),
     1, ("sampler.options", "bogus", "offspring")),
    ("unknown-tpe-option", _search("so2.yaml", _cfg(sampler={"name": "tpe", "options": {"n_startup": 2}})),
     1, ("sampler.options", "n_startup", "n_startup_trials")),
    ("weights-do-not-match-config", _search("wm.yaml", _cfg(model=_mismatched_weights)), 1,
     ("do not match its config.json", "mlp")),
]


@pytest.mark.parametrize("case", CASES_23, ids=[c[0] for c in CASES_23])
def test_bad_input_issue_23(world, capfd, case):
    """Issue 23 point 5: one line, the database untouched, exit 2 for a bad flag value; and no
    transformers load report before the line (capfd: what the process really wrote)."""
    _, setup, code, words = case
    argv, url = setup(world)
    _check(capfd, argv, url, code, words)


def test_server_bad_input_issue_23(world, servers, capsys):
    """A PostgreSQL role that does not exist is named as such (not "create the database"); a
    600-character study name is refused before PostgreSQL sees it."""
    found, skipped = servers
    if "postgresql" not in found:
        pytest.skip(skipped.get("postgresql", "no PostgreSQL"))
    empty, full = found["postgresql"]
    no_role = sa.engine.make_url(full).set(username="evoprune_no_such_role").render_as_string(hide_password=False)
    line = _check(capsys, ["show", "--storage", no_role, "--study", "s"], full, 1, ("evoprune_no_such_role",))
    assert "CREATE ROLE" in line and "CREATE DATABASE" not in line, line
    cfg = world.write("srv-long.yaml", tiny_config(world.data))
    _check(capsys, ["search", cfg, "--storage", empty, "--study", "y" * 600], empty, 2, ("--study", "512"))
