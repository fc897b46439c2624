"""The probe mode's own calibration set for its history (issue 25: ``probe: {calibration: {...}}``)."""

from __future__ import annotations

import pytest

from helpers import char_tokenizer
from tiny_models import tiny_model

from evoprune.search import StudyConfig, build_runtime
from evoprune.space import ProbeSettings

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, probe: dict) -> StudyConfig:
    (tmp_path / "t.txt").write_text(" ".join(["the king of a sword and crown night falls on the river"] * 400))
    return StudyConfig.from_dict({
        "model": "tiny-llama-in-memory",
        "data": {"source": "text", "train": [str(tmp_path / "t.txt")], "validation": [str(tmp_path / "t.txt")]},
        "calibration": {"num_sequences": 4, "seq_len": 32},
        "space": {"attention": "kv_groups", "mlp_step": 16, "mode": "probe", "probe": probe},
        "stages": [{"name": "final", "evaluators": ["kl"], "eval_tokens": 128, "seq_len": 32}],
        "seed": 0, "cache_dir": str(tmp_path / "cache"),
    })


def test_own_calibration_set_builds_the_history_and_is_fingerprinted(tmp_path):
    own = {"batch_ratio": 0.25, "calibration": {"num_sequences": 6, "seq_len": 48}}
    cfg, base = _config(tmp_path, own), _config(tmp_path, {"batch_ratio": 0.25})
    assert cfg.fingerprint != base.fingerprint and StudyConfig.from_dict(cfg.to_dict()) == cfg
    rt = build_runtime(cfg, model=tiny_model("llama"), tokenizer=char_tokenizer())
    probe = rt.pruner.probe
    assert probe.settings.calibration.num_sequences == 6 and probe.calib_tokens == 6 * 48
    assert all(d["o"].shape[0] == 48 for d in probe.calib_history.values())  # positions of its own set
    rt0 = build_runtime(base, model=tiny_model("llama"), tokenizer=char_tokenizer())
    assert all(d["o"].shape[0] == 32 for d in rt0.pruner.probe.calib_history.values())  # the importance set
    assert rt.space.key != rt0.space.key and probe.cache_key() != rt0.pruner.probe.cache_key()


def test_bad_probe_calibration_is_one_line(tmp_path):
    for bad, match in [({"calibration": {"num_sequences": 0}}, "positive integer"),
                       ({"calibration": {"samples": 4}}, "unknown keys"),
                       ({"calibration": 64}, "must be a mapping")]:
        with pytest.raises(ValueError, match=match):
            _config(tmp_path, bad)
    cfg = _config(tmp_path, {"calibration": {"num_sequences": 10_000, "seq_len": 256}})
    with pytest.raises(ValueError, match="lower num_sequences"):
        build_runtime(cfg, model=tiny_model("llama"), tokenizer=char_tokenizer())
    assert ProbeSettings().to_dict() == {"seq_ratio": 0.5, "batch_ratio": 0.05, "momentum": 0.99, "history": True}
    assert ProbeSettings(calibration={"seq_len": 8}).calibration.num_sequences == 64
