"""Bench: a 10,000-trial study resumes in < 3 s and computes its Pareto front in < 2 s.

The study is synthetic but shaped like a real one: a 16-layer Llama-like search space
(48 genes, so 48 Optuna params per trial), two objectives (KL, params ratio), a candidate
row, a claim and two stages of results per trial (the final stage for a quarter of them),
and sampler states of the last generations. The rows are bulk-inserted (one transaction
per table), then timed, each in a fresh process-level state (new engines):

* ``resume``: what ``evoprune resume`` does besides loading the model -- open the storage,
  load the study and its config, reap dead workers, check fingerprints, load the sampler
  state -- up to its first new trial (claim, create the trial with fixed params, record the candidate),
  never materializing all trials (``study.ask()`` would: Optuna's trial cache reads all 10,000
  when it looks for waiting trials; the driver creates its trials RUNNING in one call instead);
* ``pareto``: ``EvoStudy.pareto_front()`` (one query over Optuna's value rows), checked
  against Optuna's own ``study.best_trials``;
* for information: ``get_trials(deepcopy=False)`` of all 10,000 trials.

Usage: ``python bench/study_scale.py [--trials 10000] [--storage URL] [--repeats 3]``
(default storage: a temporary SQLite file); ``--smoke``: 100 trials, one timed run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import parse_args


def scale_config(model: str = "reference:tiny"):
    """The synthetic large study's config (also used by bench/report_scale.py)."""
    from evoprune.search import StudyConfig

    return StudyConfig.from_dict(dict(
        model=model,
        calibration={"num_sequences": 8, "seq_len": 64},
        space={"attention": "kv_groups", "mlp_step": 64, "drop_blocks": True},
        budget={"metric": "params", "max_ratio": 0.7},
        stages=[
            {"name": "s1", "evaluators": ["kl"], "eval_tokens": 2048, "seq_len": 256, "promote": {"top_k": 4}},
            {"name": "final", "evaluators": ["kl"], "eval_tokens": 16384, "seq_len": 256},
        ],
        sampler={"name": "evolutionary", "options": {"offspring": 16}},
        objectives=["kl", "params"],
        seed=0,
    ))


#: the synthetic model's config.json (no weights): the space of every synthetic trial
MODEL = dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=16, hidden_size=512,
             num_attention_heads=8, num_key_value_heads=4, intermediate_size=1408, vocab_size=4096,
             tie_word_embeddings=False, max_position_embeddings=2048)


def populate(url: str, n_trials: int, *, model: str = "reference:tiny", final_every: int = 4, n_seeds: int = 0,
             seed: int = 0) -> dict:
    """Create the study and bulk-insert ``n_trials`` finished trials with all their rows: every
    ``final_every``-th trial COMPLETE (both stages), the others PRUNED at stage 1; the first
    ``n_seeds`` come from source ``"seed"`` (baselines). Also used by bench/report_scale.py."""
    import sqlalchemy as sa
    from optuna.distributions import distribution_to_json
    from optuna.trial import TrialState

    from evoprune import create_study
    from evoprune._optuna_private import rdb_models
    from evoprune.search._runtime import space_from_config
    from evoprune.storage._tables import ClaimRow, StageResultRow, StageRow, TrialRow

    om = rdb_models()

    config = scale_config(model)
    study = create_study(config, storage=url, study_name="scale")
    space = space_from_config(config, MODEL)
    dists = {k: distribution_to_json(d) for k, d in space.optuna_distributions().items()}
    rng = np.random.default_rng(seed)
    cands, keys = [], set()
    while len(cands) < n_trials:
        c = space.random(rng)
        if c.key not in keys:
            keys.add(c.key)
            cands.append(c)
    sid, esid = study.db.optuna_study_id, study.db.study_id
    t0 = dt.datetime(2026, 1, 1)
    trials, values, params, uattrs, erows, claims, stages, results = [], [], [], [], [], [], [], []
    with study.storage.engine.connect() as conn:
        first_id = 1 + (conn.execute(sa.select(sa.func.max(om.TrialModel.trial_id))).scalar() or 0)
    for i, c in enumerate(cands):
        tid = first_id + i
        s1 = float(rng.gamma(2.0, 0.05))
        final = i % final_every == 0
        source = "seed" if i < n_seeds else "evolution"
        kl = s1 * float(rng.uniform(0.8, 1.0))
        ratio = space.ratio(c, "params")
        state = TrialState.COMPLETE if final else TrialState.PRUNED
        start = t0 + dt.timedelta(seconds=2 * i)
        trials.append(dict(trial_id=tid, number=i, study_id=sid, state=state, datetime_start=start,
                           datetime_complete=start + dt.timedelta(seconds=1)))
        if final:
            for obj, v in enumerate((kl, ratio)):
                values.append(dict(trial_id=tid, objective=obj, value=v,
                                   value_type=om.TrialValueModel.TrialValueType.FINITE))
        for name, level in space.params_of(c).items():
            params.append(dict(trial_id=tid, param_name=name, param_value=float(level), distribution_json=dists[name]))
        uattrs.append(dict(trial_id=tid, key="evoprune:candidate_key", value_json=json.dumps(c.key)))
        uattrs.append(dict(trial_id=tid, key="evoprune:source", value_json=json.dumps(source)))
        erows.append(dict(study_id=esid, trial_id=tid, trial_number=i, candidate_key=c.key,
                          candidate_json=c.to_json(), source=source, owner="bench", created_at=start))
        claims.append(dict(study_id=esid, candidate_key=c.key, owner="bench", status="claimed", attempts=1,
                           trial_id=tid, claimed_at=start, updated_at=start))
        for si, (st, v) in enumerate((("s1", s1), ("final", kl))[: 2 if final else 1]):
            stages.append(dict(study_id=esid, trial_id=tid, stage=st, stage_index=si, objective=v,
                               direction="minimize", promoted=None if st == "final" else final, seconds=0.5,
                               created_at=start))
            results.append(dict(study_id=esid, trial_id=tid, stage=st, evaluator="kl",
                                tokens=2048 if st == "s1" else 16384, value=v, seconds=0.5, direction="minimize",
                                details_json="{}", created_at=start))
    t = time.perf_counter()
    with study.storage.engine.begin() as conn:
        for table, rows in ((om.TrialModel.__table__, trials), (om.TrialValueModel.__table__, values),
                            (om.TrialParamModel.__table__, params), (om.TrialUserAttributeModel.__table__, uattrs),
                            (TrialRow.__table__, erows), (ClaimRow.__table__, claims),
                            (StageRow.__table__, stages), (StageResultRow.__table__, results)):
            for k in range(0, len(rows), 5000):
                conn.execute(sa.insert(table), rows[k:k + 5000])
        if conn.dialect.name == "postgresql":  # explicit trial ids: move the id sequence past them
            conn.execute(sa.text("SELECT setval(pg_get_serial_sequence('trials', 'trial_id'), "
                                 "(SELECT MAX(trial_id) FROM trials))"))
    insert_s = time.perf_counter() - t
    # sampler states of the newest generations (each lists every key seen so far, as the real one does)
    gens = n_trials // 16
    for g in range(max(0, gens - 32), gens):
        seen = [c.key for c in cands[: 16 * (g + 1)]]
        study.db.save_sampler_state(g + 1, {"version": 1, "kind": "evolutionary", "generation": g + 1,
                                            "population": [{"candidate": cands[16 * g].to_dict(), "fitness": 0.1}],
                                            "pending": [], "seen": seen, "rng": {"state": str(g)}})
    study.db.record_fingerprints({"model": "m" * 16, "data": "d" * 16, "space": space.key})
    study.close()
    tables = (trials, values, params, uattrs, erows, claims, stages, results)
    return {"space": space, "insert_s": insert_s, "rows": sum(len(rows) for rows in tables),
            "complete": len(values) // 2}


def time_resume(url: str, space, rng) -> tuple[float, dict]:
    """Open the study as ``evoprune resume`` does (minus loading the model) and create its next trial
    the way the search driver does (claim, create the trial with fixed params, record the candidate)."""
    from optuna.trial import TrialState

    from evoprune import load_study
    from evoprune._optuna_private import trial_id
    from evoprune.search._searcher import fixed_trial

    candidate = space.random(rng)
    t = time.perf_counter()
    study = load_study(storage=url, study_name="scale")
    report = study.reap()
    study.db.check_fingerprints({"model": "m" * 16, "data": "d" * 16})
    generation, state = study.recorder.load_sampler_state()
    t_state = time.perf_counter() - t
    assert study.recorder.claim(candidate.key)
    trial = fixed_trial(study.optuna_study, space.params_of(candidate), space.optuna_distributions(),
                        user_attrs={"evoprune:source": "evolution"})
    study.recorder.record_candidate(trial_id(trial), candidate, source="evolution")
    elapsed = time.perf_counter() - t
    info = {"generation": generation, "seen": len(state["seen"]), "reaped": bool(report), "state_s": t_state}
    study.optuna_study.tell(trial, state=TrialState.FAIL)  # not evaluated here
    study.recorder.release(candidate.key)
    study.close()
    return elapsed, info


def time_pareto(url: str) -> tuple[float, list, object]:
    from evoprune import load_study

    study = load_study(storage=url, study_name="scale")
    t = time.perf_counter()
    front = study.pareto_front()
    elapsed = time.perf_counter() - t
    return elapsed, front, study


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--storage", default=None, help="database URL (default: a temporary SQLite file)")
    ap.add_argument("--repeats", type=int, default=3)
    args = parse_args(ap, argv, smoke=dict(trials=100, repeats=1))
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tmp = tempfile.TemporaryDirectory()
    url = args.storage or f"sqlite:///{Path(tmp.name) / 'scale.db'}"
    print(f"populating {args.trials} trials in {url.split('://')[0]} ...", flush=True)
    made = populate(url, args.trials)
    resume_times, pareto_times = [], []
    rng = np.random.default_rng(1)
    study = None
    for _ in range(args.repeats):
        r, info = time_resume(url, made["space"], rng)
        resume_times.append(r)
        if study is not None:
            study.close()
        p, front, study = time_pareto(url)
        pareto_times.append(p)
    t = time.perf_counter()
    all_trials = study.optuna_study.get_trials(deepcopy=False)
    trials_s = time.perf_counter() - t
    t = time.perf_counter()
    optuna_front = sorted(tr.number for tr in study.optuna_study.best_trials)
    optuna_front_s = time.perf_counter() - t
    same = optuna_front == [pt.number for pt in front]
    study.close()
    resume_s, pareto_s = statistics.median(resume_times), statistics.median(pareto_times)
    rows = [
        ("trials", f"{args.trials}"),
        ("rows inserted", f"{made['rows']}"),
        ("bulk insert (s)", f"{made['insert_s']:.2f}"),
        ("resume (s), median of runs", f"{resume_s:.3f}  (runs: {', '.join(f'{x:.3f}' for x in resume_times)})"),
        ("  of which: study, config, reap, fingerprints, sampler state", f"{info['state_s']:.3f}"),
        ("  sampler generation / keys seen", f"{info['generation']} / {info['seen']}"),
        ("pareto_front (s), median", f"{pareto_s:.3f}  (runs: {', '.join(f'{x:.3f}' for x in pareto_times)})"),
        ("  front size", f"{len(front)}"),
        ("  equals optuna best_trials", f"{same}"),
        ("optuna best_trials (s, info)", f"{optuna_front_s:.3f}"),
        ("get_trials(deepcopy=False) (s, info)", f"{trials_s:.3f} ({len(all_trials)} trials)"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    ok_resume = resume_s < 3.0
    ok_pareto = pareto_s < 2.0 and same
    print(f"TARGET resume_seconds {resume_s:.3f} < 3 {'PASS' if ok_resume else 'FAIL'}")
    print(f"TARGET pareto_seconds {pareto_s:.3f} < 2 {'PASS' if ok_pareto else 'FAIL'}")
    tmp.cleanup()
    return 0 if args.smoke or (ok_resume and ok_pareto) else 1  # --smoke checks the bench runs, not its targets


if __name__ == "__main__":
    sys.exit(main())
