"""Helpers shared by the test modules (no tests, no fixtures: the fixtures live in ``conftest.py``).

``pyproject.toml`` puts ``tests/`` on ``sys.path``, so every test module, in whatever folder,
imports these as ``from helpers import ...`` (and the model factories as
``from tiny_models import ...``). A test module never imports another test module.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sqlite3
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import torch

from evoprune.space import Candidate, LayerConfig, ModelSpec

# --------------------------------------------------------------------------- evaluator tests


@dataclasses.dataclass
class RefData:
    """The trained tiny reference model with tokenized splits (the ``ref_data`` fixture)."""

    path: Path
    tokenizer: object
    eval_ids: torch.Tensor
    train_ids: torch.Tensor
    fingerprint: str

    def model(self):
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(self.path).eval()


def candidate(spec: ModelSpec, *, mlp=None, kv=None, sparsity=0.0, drop=(), pattern="unstructured") -> Candidate:
    """All layers alike: ``mlp`` channels, ``kv`` KV heads (dense defaults); blocks in ``drop`` removed."""
    mlp = spec.intermediate_size if mlp is None else mlp
    kv = spec.num_kv_heads if kv is None else kv
    layers = []
    for i in range(spec.num_layers):
        if i in drop:
            layers.append(LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0))
        else:
            layers.append(LayerConfig(num_kv_heads=kv, q_per_kv=spec.q_per_kv, mlp_channels=mlp, sparsity=sparsity))
    return Candidate(layers=tuple(layers), sparsity_pattern=pattern)


def calib(ids: torch.Tensor, n: int = 8, seq_len: int = 64) -> torch.Tensor:
    return ids[: n * seq_len].view(n, seq_len)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes, for bit-for-bit comparisons."""
    return t.detach().contiguous().view(torch.uint8).clone()


def char_tokenizer():
    """A character-level fast tokenizer whose 97 ids match the tiny models' vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}  # 97 = tiny models' vocab
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


# --------------------------------------------------------------------------- pruning round trips


def random_layer(spec: ModelSpec, rng: random.Random, pattern: str) -> LayerConfig:
    levels = (0.0, 0.5) if pattern == "2:4" else (0.0, 0.1, 0.3, 0.5, 0.7)
    drop_attn = rng.random() < 0.2
    drop_mlp = rng.random() < 0.2
    kv = 0 if drop_attn else rng.randint(1, spec.num_kv_heads)
    m = 0 if drop_attn else rng.randint(1, spec.q_per_kv)
    mc = 0 if drop_mlp else rng.randint(1, spec.intermediate_size)
    if pattern == "2:4" and mc:  # 2:4 needs down_proj's input width (the kept channels) divisible by 4
        mc = max(4, mc - mc % 4)
    overrides = {}
    for name in rng.sample(("q", "k", "v", "o", "gate", "up", "down"), rng.randint(0, 3)):
        overrides[name] = rng.choice(levels)
    return LayerConfig(
        num_kv_heads=kv, q_per_kv=m, mlp_channels=mc, sparsity=rng.choice(levels), linear_sparsity=overrides
    )


def expected_params(spec: ModelSpec, cand: Candidate) -> int:
    """The cost model's parameter formula, written out independently."""
    h, hd = spec.hidden_size, spec.head_dim
    n = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2) + h
    for lc in cand.layers:
        if not lc.attn_dropped:
            nq, nkv = lc.num_q_heads * hd, lc.num_kv_heads * hd
            n += h + 2 * h * nq + 2 * h * nkv
            n += (nq + 2 * nkv) if spec.qkv_bias else 0
            n += h if spec.o_bias else 0
            n += 2 * hd if spec.qk_norm else 0
        if not lc.mlp_dropped:
            mc = lc.mlp_channels
            n += h + 3 * h * mc + ((2 * mc + h) if spec.mlp_bias else 0)
    return n


# Reload exported checkpoints in a fresh process: ``python -c RELOAD_SCRIPT '<jobs json>'``.
RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from evoprune.pruning import load_pruned
    jobs = json.loads(sys.argv[1])
    for job in jobs:
        model = load_pruned(job["dir"])
        ids = torch.tensor(job["ids"])
        prompt = torch.tensor(job["prompt"])
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        out = {
            "logits": model(ids).logits.contiguous(),
            "gen_cache": model.generate(prompt, use_cache=True, **kw),
            "gen_nocache": model.generate(prompt, use_cache=False, **kw),
            "numel": torch.tensor(sum(p.numel() for p in model.parameters())),
        }
        save_file(out, job["out"])
    """
)

# --------------------------------------------------------------------------- storage backends
# Every test that takes the ``storage_url`` fixture runs once per backend, like Optuna's own
# storage tests:
#
# * ``sqlite``: a fresh file in ``tmp_path``;
# * ``postgresql``: a uniquely named database on 127.0.0.1:5432 (``$EVOPRUNE_TEST_POSTGRES``),
#   dropped afterwards;
# * ``mysql``: the same on 127.0.0.1:3306 (``$EVOPRUNE_TEST_MYSQL``).
#
# A server backend is skipped (with the reason) only when no server answers.

SERVERS = {
    "postgresql": os.environ.get("EVOPRUNE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mysql": os.environ.get("EVOPRUNE_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
BACKENDS = ("sqlite", "postgresql", "mysql")
_unreachable: dict[str, str] = {}


def _admin_engine(kind: str) -> sa.Engine:
    url = SERVERS[kind]
    if kind == "postgresql":
        return sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    return sa.create_engine(url, pool_pre_ping=True)


def server_database(kind: str) -> tuple[str, callable]:
    """A new empty database on the ``kind`` server: (url, drop)."""
    if kind in _unreachable:
        pytest.skip(_unreachable[kind])
    admin = _admin_engine(kind)
    name = f"evoprune_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
            if kind == "mysql":
                conn.commit()
    except sa.exc.OperationalError as exc:
        admin.dispose()
        _unreachable[kind] = f"no {kind} server answers at {sa.engine.make_url(SERVERS[kind]).render_as_string()}: " \
                             f"{str(exc.orig).splitlines()[0]}"
        pytest.skip(_unreachable[kind])
    url = sa.engine.make_url(SERVERS[kind]).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect() as conn:
            if kind == "postgresql":
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
                conn.commit()
        admin.dispose()

    return url, drop


def make_storage_url(kind: str, tmp_path) -> tuple[str, callable]:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}", lambda: None
    return server_database(kind)


def storage_engine(url: str) -> sa.Engine:
    """An engine on ``url`` configured as evoprune configures its own (SQLite: WAL, ``BEGIN IMMEDIATE``)."""
    from evoprune.storage._engine import configure_sqlite_engine, normalize_url

    engine = sa.create_engine(normalize_url(url))
    configure_sqlite_engine(engine)
    return engine


def dump(url: str) -> Any:
    """Every row of every table (SQLite: the SQL dump, schema included); ``None``: no database."""
    if url.startswith("sqlite"):
        path = Path(sa.engine.make_url(url).database)
        if not path.exists():
            return None
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return list(conn.iterdump())
        finally:
            conn.close()
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            out = {}
            for table in sorted(sa.inspect(conn).get_table_names()):
                rows = conn.execute(sa.text(f"SELECT * FROM {table}")).all()
                out[table] = sorted(map(repr, rows))
            return out
    finally:
        engine.dispose()


def trial_state_counts(engine: sa.Engine) -> dict[str, int]:
    """Optuna trials per state (``{}`` before the tables exist)."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT state, COUNT(*) FROM trials GROUP BY state")).all()
    except sa.exc.DBAPIError:  # tables not created yet
        return {}
    return {str(s).rsplit(".", 1)[-1]: int(n) for s, n in rows}


# --------------------------------------------------------------------------- study configs


def tiny_study_config(**changes):
    """A small StudyConfig (nothing is loaded until a runtime is built)."""
    from evoprune.search import StudyConfig

    data = dict(
        model="reference:tiny",
        calibration={"num_sequences": 8, "seq_len": 64},
        space={"attention": None, "mlp_step": 16},
        budget={"metric": "params", "max_ratio": 0.8},
        stages=[
            {"name": "s1", "evaluators": ["kl"], "eval_tokens": 512, "seq_len": 64, "promote": {"top_k": 2}},
            {"name": "final", "evaluators": ["kl"], "eval_tokens": 1024, "seq_len": 64},
        ],
        sampler={"name": "evolutionary", "options": {"offspring": 4}},
        objectives=["kl", "params"],
        seed=1,
    )
    data.update(changes)
    return StudyConfig.from_dict(data)


def tiny_text_config(data_dir: Path, model: str = "reference:tiny", **changes: Any) -> dict[str, Any]:
    """A tiny study config dict (text data, 2 stops) that searches in well under a second."""
    cfg: dict[str, Any] = dict(
        model=model,
        data={"source": "text", "train": [str(data_dir / "train.txt")], "validation": [str(data_dir / "valid.txt")]},
        calibration={"num_sequences": 2, "seq_len": 32},
        space={"attention": None, "mlp_step": 16},
        budget={"metric": "params", "max_ratio": 0.9},
        stages=[{"name": "final", "evaluators": ["kl"], "eval_tokens": 64, "seq_len": 32}],
        sampler={"name": "evolutionary", "options": {"offspring": 2}},
        objectives=["kl", "params"],
        stop={"n_trials": 1},
    )
    cfg.update(changes)
    return cfg


# The YAML config of the resume / determinism / liveness tests (reference:tiny, two stages).
RESUME_CONFIG = """\
model: reference:tiny
calibration: {num_sequences: 8, seq_len: 64}
space: {attention: null, mlp_step: 16}
budget: {metric: params, max_ratio: 0.8}
stages:
  - {name: s1, evaluators: [kl], eval_tokens: 512, seq_len: 64, promote: {top_k: 2}}
  - {name: final, evaluators: [kl], eval_tokens: 1024, seq_len: 64}
sampler: {name: evolutionary, options: {offspring: 4}}
objectives: [kl, params]
seed: 1
"""


def _status_candidate(i: int) -> Candidate:
    return Candidate(layers=(LayerConfig(num_kv_heads=2, q_per_kv=2, mlp_channels=16 * (i + 1)),) * 4)


def build_study(url: str, **config):
    """A single-objective study with hand-written rows: trial 0 complete (kl 0.4), trial 1 pruned at
    s1, trial 2 complete (kl 0.2), trial 3 running; s1 costs 512 tokens, final 1024."""
    import time

    from optuna.trial import TrialState

    from evoprune import create_study
    from evoprune._optuna_private import trial_id

    cfg = tiny_study_config(objectives=["kl"], **config)
    study = create_study(cfg, storage=url, study_name="st")
    rec = study.recorder
    plan = [(0.5, True, 0.4), (0.9, False, None), (0.3, True, 0.2)]
    for i, (s1, promoted, final) in enumerate(plan):
        t = study.optuna_study.ask()
        tid = trial_id(t)
        rec.record_candidate(tid, _status_candidate(i), source="initial")
        rec.record_stage(tid, "s1", "kl", 512, s1, 0.1, {})
        rec.record_stage_result(tid, "s1", 0, s1, promoted)
        if final is None:
            study.optuna_study.tell(t, state=TrialState.PRUNED)
            continue
        rec.record_stage(tid, "final", "kl", 1024, final, 0.2, {})
        rec.record_stage_result(tid, "final", 1, final, None)
        if i == 2:
            time.sleep(1.05)  # MySQL keeps whole seconds: let the trials span one
        study.optuna_study.tell(t, [final])
    t = study.optuna_study.ask()
    rec.record_candidate(trial_id(t), _status_candidate(3), source="initial")
    return study


def sibling_module(test_file: str, name: str) -> Any:
    """The test module ``name`` (``"test_export_gguf"``) in the folder of ``test_file`` (pass ``__file__``):
    the room folders under tests/ are not packages, so a test reuses a neighbour's helpers this way."""
    import importlib.util
    import sys

    path = Path(test_file).resolve().parent / f"{name}.py"
    key = f"_evoprune_tests_{path.parent.name}_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
