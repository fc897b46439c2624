"""Named schedules: ``preset: NAME`` in a study config fills ``sampler`` and ``stages`` (what the
config does not give itself).

- ``default``: evoprune's own schedule -- the default of a config without a preset: 16
  offspring ranked by a surrogate from a pool of 64 mutants; a first stage of 2,048 tokens
  whose racing promotion (:class:`~evoprune.evaluators.Race`) sends on every offspring not
  clearly worse than the leader (at most 4), a second of 8,192 tokens racing again (at most 2),
  a final stage of 16,384 tokens, each *extending* the one before (a promoted candidate pays
  only for the new windows); before the surrogate has data, the pool is ranked by the
  importance prior (calibration influence of what a candidate removes); and the convergence
  stop (a generation without a new incumbent or a finalist within the noise band, at least
  half as many tokens since the incumbent took over as it took to find it, half of its
  one-switch neighbourhood proposed, and no unseen candidate the surrogate gives a chance to beat
  it); a finalist within the noise band of the incumbent is settled on up to 4 x the final
  stage's tokens (``settle: 4``, paired nested windows; a tie keeps the incumbent).
- ``evopress`` (= ``evopress-depth``), ``evopress-levels`` (= ``evopress-unstructured``),
  ``evopress-fast``: EvoPress's own loop with its published schedules (``evo_drop_search.py`` with
  ``run_drop_search.sh``: 32 offspring, survivors 2 @ 2,048 tokens -> 1 @ 32,768, the first parent
  the best of 64 random candidates scored on 2,048 tokens; ``evo_prune_search.py`` with
  ``run_prune_search.sh``: 64 offspring, 8 @ 2,048 -> 2 @ 16,384 -> 1 @ 65,536 from the uniform
  candidate; the super-fast setting: 16 offspring, 1 @ 512 -> 1 @ 8,192). As its code runs it:
  every selection step scores on windows drawn afresh (``fresh_windows``: a deterministic function
  of the data, the stage, the seed and the generation, so a run is reproducible and resumable);
  the parent joins the last selection step and is scored again on its fresh windows every
  generation (``rescore_parents``; its tokens count); a candidate seen in an earlier generation may
  be proposed again (``repeats``: duplicates are rejected only within the generation and the
  parents); fixed top-k promotion, independent windows per stage, no surrogate, no convergence
  stop. EvoPress runs a fixed number of generations: ``int(k(n-k)/1.5)`` for dropping ``k`` of
  ``n`` blocks (:func:`evopress_depth_generations`), 400 for unstructured sparsity; give it as the
  stop (``stop: {n_generations: ...}``).
- ``evopress-fixed``: the depth schedule of ``evopress-depth`` run by evoprune's loop instead of
  EvoPress's, the cheaper and deterministic variant: every stage keeps one token set for the whole
  run (a parent's last-stage score is kept, not re-scored), a candidate is never proposed twice, and
  the first parent is the sampler's default ``init`` (not the best of 64).

>>> from evoprune.search import StudyConfig
>>> cfg = StudyConfig.from_dict({"preset": "evopress-depth", "calibration": {"num_sequences": 8, "seq_len": 256}})
>>> [(s.name, s.eval_tokens, s.promote) for s in cfg.stages], cfg.sampler.options["offspring"]
([('s1', 2048, {'top_k': 2}), ('final', 32768, None)], 32)
>>> evopress_depth_generations(num_blocks=8, drop=3)
10
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

__all__ = ["PRESETS", "apply_preset", "evopress_depth_generations"]


def _stage(name: str, tokens: int, promote: Any = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "evaluators": ["kl"], "eval_tokens": tokens, "seq_len": 256, "promote": promote, **extra}


def _evopress(offspring: int, stages: list[dict[str, Any]], *, faithful: bool = True,
              init: dict[str, Any] | None = None) -> dict[str, Any]:
    options = {"offspring": offspring, "parents": 1, "surrogate": 1, "patience": None}
    if faithful:
        options.update(fresh_windows=True, rescore_parents=True, repeats=True, **(init or {"init": "uniform"}))
    return {"sampler": {"name": "evolutionary", "options": options}, "stages": stages}


_DEPTH = [_stage("s1", 2048, {"top_k": 2}), _stage("final", 32768)]
_LEVELS = [_stage("s1", 2048, {"top_k": 8}), _stage("s2", 16384, {"top_k": 2}), _stage("final", 65536)]
#: EvoPress's drop search starts from the best of 64 random candidates scored on 2,048 tokens (its first stage)
_BEST_OF_64 = {"init": "random", "init_samples": 64}


#: name -> the config sections it fills
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "sampler": {"name": "evolutionary", "options": {"offspring": 16, "surrogate": 4, "patience": 1,
                                                         "patience_fraction": 0.5, "explored": 0.5, "settle": 4,
                                                         "unseen_chance": 0.05}},
        "stages": [_stage("s1", 2048, {"race": 2.0, "max_count": 4}),
                   _stage("s2", 8192, {"race": 2.0, "max_count": 2}, extends="s1"),
                   _stage("final", 16384, extends="s2")],
    },
    "evopress": _evopress(32, _DEPTH, init=_BEST_OF_64),
    "evopress-depth": _evopress(32, _DEPTH, init=_BEST_OF_64),
    "evopress-levels": _evopress(64, _LEVELS),
    "evopress-unstructured": _evopress(64, _LEVELS),
    "evopress-fast": _evopress(16, [_stage("s1", 512, {"top_k": 1}), _stage("final", 8192)]),
    "evopress-fixed": _evopress(32, _DEPTH, faithful=False),
}


def evopress_depth_generations(*, num_blocks: int, drop: int) -> int:
    """EvoPress's generation count for dropping ``drop`` of ``num_blocks`` blocks: ``int(k(n-k)/1.5)``
    (``run_drop_search.sh``), at least 1."""
    return max(1, int(drop * (num_blocks - drop) / 1.5))


def apply_preset(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (a config dict) with its ``preset`` key expanded: the preset's ``stages`` where the
    config gives none (windows of the calibration's ``seq_len``), its ``sampler`` where the config
    names no other sampler (the config's own sampler options win)."""
    out = dict(data)
    name = out.pop("preset", None)
    if name is None:
        return out
    if name not in PRESETS:
        raise ValueError(f"StudyConfig: unknown preset {name!r}; use one of {sorted(PRESETS)}.")
    preset = copy.deepcopy(PRESETS[name])
    if out.get("stages") is None:
        calib = out.get("calibration")
        seq_len = calib.get("seq_len") if isinstance(calib, Mapping) else getattr(calib, "seq_len", None)
        if isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > 0:
            for st in preset["stages"]:  # windows as long as the calibration's (the model may allow no more)
                st["seq_len"] = seq_len
        out["stages"] = preset["stages"]
    sampler = out.get("sampler")
    sampler = {"name": sampler} if isinstance(sampler, str) else dict(sampler or {})
    if sampler.get("name", "evolutionary") == preset["sampler"]["name"]:
        sampler["name"] = preset["sampler"]["name"]
        sampler["options"] = {**preset["sampler"]["options"], **dict(sampler.get("options") or {})}
        out["sampler"] = sampler
    return out
