"""Healing on export: ``EvoStudy.export(..., finetune_tokens=N)`` fine-tunes the chosen candidate (structure
kept), writes the healed weights, records perplexity before/after, and leaves the dense model intact."""

from __future__ import annotations

import pytest
import torch

import evoprune
from evoprune._fingerprint import model_fingerprint
from evoprune.evaluators import perplexity
from evoprune.pruning import load_pruned

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared 2 cores: one intra-op thread

CONFIG = {
    "model": "reference:tiny",
    "calibration": {"num_sequences": 4, "seq_len": 32},
    "space": {"mlp_step": 16, "sparsity_levels": [0.0, 0.5]},
    "budget": {"metric": "params", "max_ratio": 0.7},
    "stages": [{"name": "final", "evaluators": ["kl"], "eval_tokens": 1024, "seq_len": 64}],
    "sampler": {"name": "evolutionary", "options": {"offspring": 2}},
    "objectives": ["kl"],
}


def test_export_heals_and_records_perplexity(reference_tiny, tmp_path):
    study = evoprune.create_study(CONFIG, storage=f"sqlite:///{tmp_path / 'h.db'}", study_name="h")
    try:
        study.run(n_trials=2)
        runtime = study.runtime if study.runtime is not None else study.build_runtime()
        dense_fp = model_fingerprint(runtime.model)
        number = study.pareto_front()[0].number
        cand = study.candidate(number)
        assert any(layer.mlp_channels < runtime.space.spec.intermediate_size or layer.sparsity > 0
                   for layer in cand.layers)
        with pytest.raises(ValueError, match="finetune_tokens"):
            study.export(number, tmp_path / "bad", runtime=runtime, finetune_tokens=-5)
        art = study.export(number, tmp_path / "healed", runtime=runtime, finetune_tokens=8192)
        heal = art.metrics["healing"]
        assert heal["finetune"]["tokens"] == 8192 and heal["seq_len"] == 64
        assert heal["ppl_after"] < heal["ppl_before"], heal
        assert model_fingerprint(runtime.model) == dense_fp  # the dense weights were restored
        assert study.artifacts()[-1].metrics["healing"] == heal
        # the folder holds the healed weights: reloaded, it reproduces ppl_after on the same windows
        windows = runtime.context.for_stage("export-heal").token_set(heal["eval_tokens"], 64).ids
        reloaded = load_pruned(art.path).eval()
        assert perplexity(reloaded, windows) == pytest.approx(heal["ppl_after"], rel=1e-4)
        # distillation healing: the teacher from the live model (candidate reverted once), dense restored,
        # and the export holds the distilled weights
        with pytest.raises(ValueError, match="export: loss must be one of"):
            study.export(number, tmp_path / "badloss", runtime=runtime, finetune_tokens=64, finetune_loss="mse")
        kd = study.export(number, tmp_path / "kd", runtime=runtime, finetune_tokens=8192, finetune_loss="kl",
                          finetune_temperature=2.0)
        kd_heal = kd.metrics["healing"]
        assert kd_heal["finetune"]["loss"] == "kl" and kd_heal["finetune"]["teacher_bytes"] > 0
        assert kd_heal["ppl_after"] < kd_heal["ppl_before"] and kd_heal["ppl_after"] != heal["ppl_after"]
        assert model_fingerprint(runtime.model) == dense_fp
        assert perplexity(load_pruned(kd.path).eval(), windows) == pytest.approx(kd_heal["ppl_after"], rel=1e-4)
        plain = study.export(number, tmp_path / "plain", runtime=runtime)
        assert "healing" not in plain.metrics
        assert perplexity(load_pruned(plain.path).eval(), windows) == pytest.approx(heal["ppl_before"], rel=1e-4)
    finally:
        study.close()
