"""The same config and seed give the same trials and the same Pareto front (one machine), through the CLI."""

from __future__ import annotations

from helpers import RESUME_CONFIG as CONFIG

from evoprune import load_study
from evoprune._cli import main


def _trials(url: str, name: str):
    study = load_study(storage=url, study_name=name)
    try:
        rows = [(t.number, t.state.name, tuple(t.values or ()), t.user_attrs.get("evoprune:candidate_key"))
                for t in study.trials()]
        front = sorted((p.number, tuple(p.values)) for p in study.pareto_front())
        return rows, front
    finally:
        study.close()


def test_same_config_and_seed_same_trials_and_front(tmp_path):
    cfg = tmp_path / "det.yaml"
    cfg.write_text(CONFIG)
    results = []
    for name in ("one", "two"):
        url = f"sqlite:///{tmp_path / name}.db"
        assert main(["search", str(cfg), "--storage", url, "--study", "det", "--generations", "3"]) == 0
        results.append(_trials(url, "det"))
    (rows_a, front_a), (rows_b, front_b) = results
    assert len(rows_a) >= 8 and front_a
    assert rows_a == rows_b
    assert front_a == front_b
    # and a different seed searches differently
    other = tmp_path / "other.yaml"
    other.write_text(CONFIG.replace("seed: 1", "seed: 2"))
    url = f"sqlite:///{tmp_path / 'three'}.db"
    assert main(["search", str(other), "--storage", url, "--study", "det", "--generations", "3"]) == 0
    assert _trials(url, "det")[0] != rows_a
