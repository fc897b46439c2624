"""The report's data functions on a small synthetic study with hand-computed expectations (front points,
hypervolume history, tokens, funnel counts, fidelity, heatmap cells), on SQLite and PostgreSQL; the
HTML report of that still-running study; the error messages for bad input; the docstring examples.

The synthetic study (objectives kl, params; stages s1 -> final; both minimized):

======  =========  ==========  =========  =====================  =======================
trial   source     s1 (tok.)   final      state / values          notes
======  =========  ==========  =========  =====================  =======================
0       seed       0.30 (512)  0.32       COMPLETE (0.32, 0.70)   front
1       evolution  0.50 (512)  --         PRUNED                  not promoted
2       evolution  0.20 (512)  0.22       COMPLETE (0.22, 0.78)   front
3       evolution  0.40 (512)  0.25       COMPLETE (0.25, 0.80)   dominated by trial 2
4       evolution  0.10 (512)  0.15       COMPLETE (0.15, 0.79)   front
5       evolution  (512)       --         RUNNING                 s1 record, no outcome yet
======  =========  ==========  =========  =====================  =======================

The final stage spends 1024 tokens per trial.
"""

from __future__ import annotations

import doctest
import importlib
import math
import re

import optuna
import pytest
from optuna.trial import TrialState
from helpers import make_storage_url

from evoprune import create_study
from evoprune._optuna_private import trial_id
from evoprune.report import build_report, load_snapshot, write_report
from evoprune.report._architecture import architecture_data
from evoprune.report._history import history_data
from evoprune.report._pareto import pareto_matrix_data, pareto_plot_data
from evoprune.report._stages import fidelity_data, funnel_data, spearman
from evoprune.report._snapshot import StudySnapshot, TrialView
from evoprune.search import StudyConfig
from evoprune.space import Candidate, LayerConfig, SearchSpace

TINY = dict(model_type="llama", num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=176, vocab_size=768)

CONFIG = dict(
    model="reference:tiny",
    calibration={"num_sequences": 8, "seq_len": 64},
    space={"attention": "kv_groups", "mlp_step": 16, "drop_blocks": True},
    budget={"metric": "params", "max_ratio": 0.8},
    stages=[
        {"name": "s1", "evaluators": ["kl"], "eval_tokens": 512, "seq_len": 64, "promote": {"top_k": 4}},
        {"name": "final", "evaluators": ["kl"], "eval_tokens": 1024, "seq_len": 64},
    ],
    sampler={"name": "evolutionary", "options": {"offspring": 4}},
    objectives=["kl", "params"],
    seed=1,
)

#: trial 0's architecture: full, half (and 50 % sparse), removed, MLP removed
SEED = Candidate(layers=(
    LayerConfig(num_kv_heads=2, q_per_kv=2, mlp_channels=176),
    LayerConfig(num_kv_heads=1, q_per_kv=2, mlp_channels=88, sparsity=0.5),
    LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0),
    LayerConfig(num_kv_heads=2, q_per_kv=2, mlp_channels=0),
))

# (source, s1, final, params) per trial; None: not there
ROWS = [("seed", 0.30, 0.32, 0.70), ("evolution", 0.50, None, None), ("evolution", 0.20, 0.22, 0.78),
        ("evolution", 0.40, 0.25, 0.80), ("evolution", 0.10, 0.15, 0.79)]


def _candidate(i: int) -> Candidate:
    if i == 0:
        return SEED
    return Candidate(layers=tuple(LayerConfig(num_kv_heads=2, q_per_kv=2, mlp_channels=176 - 16 * i)
                                  for _ in range(4)))


def populate(url: str, name: str = "synthetic") -> None:
    """Write the synthetic study through the study database's own write methods."""
    study = create_study(StudyConfig.from_dict(CONFIG), storage=url, study_name=name)
    db, opt = study.db, study.optuna_study
    for i, (source, s1, final, params) in enumerate(ROWS):
        trial = opt.ask()
        tid = trial_id(trial)
        c = _candidate(i)
        db.record_candidate(tid, c.key, c.to_json(), source=source)
        db.record_stage(tid, "s1", "kl", 512, s1, 0.5, direction="minimize")
        db.record_stage_result(tid, "s1", 0, s1, final is not None, direction="minimize")
        if final is None:
            opt.tell(trial, state=TrialState.PRUNED)
            continue
        db.record_stage(tid, "final", "kl", 1024, final, 1.0, direction="minimize")
        db.record_stage_result(tid, "final", 1, final, None, direction="minimize")
        opt.tell(trial, [final, params])
    running = opt.ask()  # trial 5: still being evaluated
    c = _candidate(5)
    db.record_candidate(trial_id(running), c.key, c.to_json(), source="evolution")
    db.record_stage(trial_id(running), "s1", "kl", 512, 0.9, 0.5, direction="minimize")
    study.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def study_url(request, tmp_path_factory):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, drop = make_storage_url(request.param, tmp_path_factory.mktemp(request.param))
    if request.param == "postgresql":  # a password the report must never show (the server trusts anyone)
        url = url.replace("postgres@", "postgres:s3cret@")
    populate(url)
    yield url
    drop()


@pytest.fixture(scope="module")
def snap(study_url):
    space = SearchSpace.from_model(TINY, attention="kv_groups", mlp_step=16, drop_blocks=True)
    return load_snapshot((study_url, "synthetic"), space=space)


def test_snapshot_reads_a_running_study(snap):
    assert snap.state_counts() == {"COMPLETE": 4, "PRUNED": 1, "RUNNING": 1}
    assert snap.complete_numbers() == [0, 2, 3, 4]
    assert snap.pareto_numbers() == [0, 2, 4]
    assert snap.tokens_by_trial() == {0: 1536, 1: 512, 2: 1536, 3: 1536, 4: 1536, 5: 512}
    assert "s3cret" not in snap.url


def test_pareto_front_points(snap):
    d = pareto_plot_data(snap)
    assert (d.x, d.y) == ("params", "kl")  # the cost ratio on x
    assert d.numbers == (0, 2, 3, 4)
    assert d.xs == (0.70, 0.78, 0.80, 0.79) and d.ys == (0.32, 0.22, 0.25, 0.15)
    assert d.front == (0, 2, 4)  # sorted by params
    assert d.seeds == (0,)
    assert d.dense == (1.0, 0.0)  # params ratio 1, KL to itself 0
    assert d.total == 4
    assert d.hover[0].startswith("trial 0 (seed, complete)")
    assert "blocks kept 3/4" in d.hover[0] and "kl 0.32" in d.hover[0]


def test_pareto_sample_keeps_front_and_seeds(snap):
    d = pareto_plot_data(snap, max_points=0)  # only the front (0, 2, 4) and the seed (0) stay
    assert d.numbers == (0, 2, 4) and d.front == (0, 2, 4) and d.total == 4
    assert pareto_plot_data(snap, max_points=1).numbers == (0, 2, 3, 4)


def test_pareto_on_cost_axes(snap):
    d = pareto_plot_data(snap, x="kv_bytes", y="kl")
    # every non-seed candidate keeps all KV heads (ratio 1); the seed keeps 2 + 1 + 0 + 2 of 4 x 2 groups
    assert d.xs[0] == pytest.approx(5 / 8) and d.xs[1:] == (1.0, 1.0, 1.0)
    assert d.front == (0, 4)


def test_unknown_axis_says_what_exists(snap):
    with pytest.raises(ValueError, match=r"unknown axis 'latency' for study 'synthetic'; use one of \['kl', 'params', "
                                         r"'flops', 'kv_bytes'\]"):
        pareto_plot_data(snap, x="latency", y="kl")


def test_history_best_so_far_tokens_and_hypervolume(snap):
    h = history_data(snap, reference=(1.0, 1.0))
    assert h.numbers == (0, 2, 3, 4)
    assert h.best == ((0.32, 0.70), (0.22, 0.70), (0.22, 0.70), (0.15, 0.70))
    # cumulative tokens in trial order: 1536 | +512 (pruned trial 1) +1536 | +1536 | +1536; trial 5 adds 512
    assert h.tokens == (1536, 3584, 5120, 6656) and h.total_tokens == 7168
    # 0.68*0.30 ; + 0.10*0.22 of trial 2's strip ; trial 3 dominated ; + 0.07*0.21 of trial 4's
    assert h.hypervolume == pytest.approx((0.204, 0.226, 0.226, 0.2407))
    assert h.hv_numbers == (0, 2, 3, 4)
    default = history_data(snap)
    # 10 % of the range beyond the worst value: kl 0.32 + 0.017, params 0.80 + 0.01
    assert default.reference == pytest.approx((0.337, 0.81))


def test_history_samples_the_hypervolume_at_most_n_times(snap):
    h = history_data(snap, reference=(1.0, 1.0), max_hv_points=2)
    assert h.hv_numbers == (0, 4) and h.hypervolume == pytest.approx((0.204, 0.2407))


def test_funnel_counts(snap):
    f = funnel_data(snap)
    assert f.stages == ("s1", "final")
    assert f.entered == (5, 4)  # the running trial has no s1 outcome yet
    assert f.promoted == (4, None)
    assert f.tokens == (6 * 512, 4 * 1024)
    assert f.seconds == (3.0, 4.0)


def test_fidelity_rank_correlation(snap):
    fd = fidelity_data(snap)
    assert fd.numbers == (0, 2, 3, 4)
    assert fd.first == (0.30, 0.20, 0.40, 0.10) and fd.last == (0.32, 0.22, 0.25, 0.15)
    # ranks 3,2,4,1 vs 4,2,3,1: d^2 = 1 + 1 -> 1 - 6*2/(4*15)
    assert fd.spearman == pytest.approx(0.8)


def test_heatmap_cells(snap):
    a = architecture_data(snap, [0, 4])
    assert a.trials == (0, 4)
    assert a.cells[0] == ((1.0, 1.0, 0.0, 0.0), (0.5, 0.5, 0.5, 0.0), (0.0, 0.0, 0.0, 1.0), (1.0, 0.0, 0.0, 0.5))
    assert a.cells[1] == ((1.0, 112 / 176, 0.0, 0.0),) * 4
    assert a.hover[0][2] == "layer 2: removed"
    assert a.hover[0][1] == "layer 1: KV groups 1/2, query heads 2/4, MLP 88/176"
    assert a.labels[0].startswith("trial 0 · params ")


def test_heatmap_unknown_trial_says_what_exists(snap):
    with pytest.raises(ValueError, match=r"study 'synthetic' has no trial 42 with a candidate \(it has trials 0-5\)"):
        architecture_data(snap, [0, 42])


def test_report_of_a_running_study(snap, study_url, tmp_path):
    text = build_report(snap)
    assert text.count('<div class="figure">') == 5  # pareto, history, heatmap, funnel, fidelity
    assert text.count("* plotly.js v") == 1  # inlined once
    assert not re.search(r"<script[^>]*\ssrc=", text)  # nothing loaded from elsewhere
    assert "s3cret" not in text
    for n in (0, 2, 4):  # the Pareto table's export commands
        assert f"--study synthetic --trial {n} --out out/trial-{n}</code>" in text
    assert "--trial 3 " not in text
    for what in ("fingerprints", "Library versions", "transformers", "torch", "optuna", '"max_ratio": 0.8'):
        assert what.lower() in text.lower()
    # from (URL, name) directly, and from the study object
    path = write_report((study_url, "synthetic"), tmp_path / "sub" / "r.html")
    assert path.is_file() and path.read_text().startswith("<!DOCTYPE html>")


def test_pairwise_view_of_three_objectives():
    cfg = StudyConfig.from_dict({**CONFIG, "objectives": ["kl", "params", "flops"]})
    pts = [(0.1, 0.9, 0.5), (0.2, 0.5, 0.9), (0.3, 0.6, 0.1), (0.5, 0.2, 0.6)]
    snap = StudySnapshot(name="m", url="sqlite://", config=cfg, directions=("minimize",) * 3,
                         trials=[TrialView(number=i, trial_id=i + 1, state="COMPLETE", values=v)
                                 for i, v in enumerate(pts)])
    pairs = pareto_matrix_data(snap)
    assert [(d.x, d.y) for d in pairs] == [("kl", "params"), ("kl", "flops"), ("params", "flops")]
    assert [d.front for d in pairs] == [(0, 1, 3), (0, 2), (3, 2)]  # each sorted by its x
    two = StudySnapshot(name="t", url="sqlite://", config=StudyConfig.from_dict(CONFIG),
                        directions=("minimize",) * 2, trials=[])
    with pytest.raises(ValueError, match="needs 3 or more"):
        pareto_matrix_data(two)


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    a = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    b = [2, 7, 1, 8, 2, 8, 1, 8, 2, 8]
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert math.isnan(spearman([1], [2])) and math.isnan(spearman([1, 1], [1, 2]))


def test_report_without_the_models_config(snap, tmp_path):
    """No config.json: no cost ratios, a note saying why, widths relative to the widest seen; still a report."""
    from evoprune.report._snapshot import study_space

    cfg = StudyConfig.from_dict({**CONFIG, "model": str(tmp_path / "gone")})
    space, note = study_space(cfg)
    assert space is None and note.startswith(f"cost ratios unavailable: cannot read the config of model '{tmp_path}")
    bare = StudySnapshot(name=snap.name, url=snap.url, config=cfg, directions=snap.directions,
                         trials=[t for t in snap.trials.values() if t.number], records=snap.records,
                         outcomes=snap.outcomes, space=None, space_note=note)  # without the seed (176 channels)
    assert bare.axes == ("kl", "params") and bare.costs(2) == {}
    assert architecture_data(bare, [4]).cells[0][0] == (1.0, 112 / 160, 0.0, 0.0)  # trial 1's 160: the widest
    text = build_report(bare)
    assert text.count('<div class="figure">') == 5 and "cost ratios unavailable" in text


def test_bad_study_argument():
    with pytest.raises(TypeError, match=r"expected an EvoStudy, a \(storage URL, study name\) pair"):
        load_snapshot(42)


@pytest.mark.parametrize("name", ["_arch", "_snapshot", "_pareto", "_history", "_architecture", "_stages", "_html"])
def test_docstring_examples(name):
    module = importlib.import_module(f"evoprune.report.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
