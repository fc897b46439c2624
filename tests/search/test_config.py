"""StudyConfig (validation, JSON/YAML round trips), make_sampler, build_runtime end to end."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from helpers import char_tokenizer as _char_tokenizer
from tiny_models import tiny_model

from evoprune.search import (
    BudgetSweep,
    EvolutionarySampler,
    Searcher,
    StudyConfig,
    build_runtime,
    make_sampler,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
STUDIES = Path(__file__).resolve().parents[2] / "studies"


def test_defaults_round_trip_and_yaml(tmp_path):
    cfg = StudyConfig()
    assert cfg.model == "reference:small" and cfg.calibration.seq_len == 256
    assert StudyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert StudyConfig.from_json(cfg.to_json()).fingerprint == cfg.fingerprint
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert StudyConfig.from_yaml(path) == cfg


@pytest.mark.parametrize("name", ["reference_small.yaml", "pareto_small.yaml"])
def test_example_configs_parse(name):
    cfg = StudyConfig.from_yaml(STUDIES / name)
    assert StudyConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"calibration": {"num_sequences": 8}}, "seq_len explicitly"),
        ({"model": "reference:huge"}, "unknown reference size"),
        ({"dtype": "fp8"}, "dtype must be one of"),
        ({"data": {"source": "text"}}, "needs \"train\" and \"validation\""),
        ({"data": {"source": "web"}}, "source must be one of"),
        ({"space": {"mlp_stride": 4}}, "unknown SearchSpace options"),
        ({"space": {"budget": []}}, "put budgets in StudyConfig.budget"),
        ({"stages": []}, "at least one stage"),
        ({"stages": [{"name": "a", "evaluators": ["bleu"]}]}, "unknown evaluator type"),
        ({"stages": [{"name": "a", "promote": {"best": 2}}]}, "promote must be"),
        ({"stages": [{"name": "a"}, {"name": "a"}]}, "distinct"),
        ({"sampler": {"name": "cmaes"}}, "sampler.name must be one of"),
        ({"objectives": ["kl", "bleu"]}, "neither an evaluator"),
        ({"objectives": []}, "non-empty"),
        ({"stop": {"n_trials": 0}}, "n_trials must be an int >= 1"),
        ({"budget": {"metric": "params"}}, "Budget needs a bound"),
        ({"seeed": 1}, "unknown keys"),
    ],
)
def test_validation_messages(changes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        StudyConfig.from_dict(changes)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_make_sampler_names():
    assert isinstance(make_sampler("evolutionary", {"offspring": 4})[0], EvolutionarySampler)
    sweep, _ = make_sampler("evolutionary", {"budget_sweep": [0.8, 0.5]})
    assert isinstance(sweep, BudgetSweep) and sweep.metric == "params"
    for name, cls in [("tpe", "TPESampler"), ("nsgaii", "NSGAIISampler"), ("random", "RandomSampler"),
                      ("gp", "GPSampler"), ("qmc", "QMCSampler")]:
        assert type(make_sampler(name, seed=1)[0]).__name__ == cls
    custom, mode = make_sampler("optuna.samplers:RandomSampler", {"budget_mode": "repair"}, seed=2)
    assert type(custom).__name__ == "RandomSampler" and mode == "repair"
    with pytest.raises(ValueError, match="bad options"):
        make_sampler("tpe", {"n_startup": 3})
    with pytest.raises(ValueError, match="cannot import"):
        make_sampler("nowhere.module:Sampler")


def test_build_runtime_text_data_and_search(tmp_path):
    import random

    rng = random.Random(0)
    words = ["the", "king", "of", "a", "sword", "and", "crown", "night", "falls", "thou", "art"]
    for name in ("train", "valid"):
        (tmp_path / f"{name}.txt").write_text(" ".join(rng.choice(words) for _ in range(2500)))
    cfg = StudyConfig.from_dict({
        "model": "tiny-llama-in-memory",
        "data": {"source": "text", "train": [str(tmp_path / "train.txt")], "validation": [str(tmp_path / "valid.txt")]},
        "calibration": {"num_sequences": 4, "seq_len": 32},
        "space": {"attention": "kv_groups", "mlp_step": 16, "frozen_layers": [0]},
        "budget": [{"metric": "params", "max_ratio": 0.7}],
        "stages": [{"name": "s1", "evaluators": ["kl"], "eval_tokens": 128, "seq_len": 32, "promote": {"top_k": 1}},
                   {"name": "final", "evaluators": ["kl", {"type": "cost", "metric": "params", "name": "params"}],
                    "eval_tokens": 256, "seq_len": 32}],
        "sampler": {"name": "evolutionary", "options": {"offspring": 3}},
        "objectives": ["kl", "params"],
        "seed": 1,
        "stop": {"n_generations": 2},
        "cache_dir": str(tmp_path / "cache"),
    })
    runtime = build_runtime(cfg, model=tiny_model("llama"), tokenizer=_char_tokenizer())
    assert set(runtime.fingerprints) == {"model", "data", "space", "config", "data_files"}
    assert tuple(runtime.calib_ids.shape) == (4, 32)
    assert runtime.directions == ["minimize", "minimize"]
    assert runtime.space.budget[0].max_ratio == 0.7
    assert [s.name for s in runtime.pipeline.stages] == ["s1", "final"]
    study = runtime.create_study()
    sampler, mode = runtime.make_sampler()
    stats = Searcher(runtime, study, sampler, budget_mode=mode, progress=False).run(**cfg.stop.kwargs())
    assert stats.generations == 2 and study.best_trials
    for t in study.best_trials:  # the params objective is the Cost evaluator's value
        cand = runtime.space.candidate_from_params(t.params)
        assert t.values[1] == pytest.approx(runtime.space.ratio(cand, "params"))
    again = build_runtime(cfg, model=tiny_model("llama"), tokenizer=_char_tokenizer())
    assert again.fingerprints == runtime.fingerprints and again.pruner.cache_hit


@pytest.mark.slow
def test_build_runtime_reference_tiny(reference_tiny):  # the fixture builds the model on a fresh machine
    cfg = StudyConfig.from_dict({
        "model": "reference:tiny",
        "calibration": {"num_sequences": 4, "seq_len": 64},
        "space": {"attention": None, "mlp_step": 16},
        "budget": {"metric": "params", "max_ratio": 0.8},
        "stages": [{"name": "final", "evaluators": ["kl"], "eval_tokens": 256, "seq_len": 64}],
        "sampler": "random",
    })
    runtime = build_runtime(cfg)
    study = runtime.create_study()
    assert type(study.sampler).__name__ == "RandomSampler"
    stats = Searcher(runtime, study, progress=False).run(n_trials=2)
    assert stats.complete == 2
