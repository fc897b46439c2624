"""evoprune.baselines: one-shot compression methods, usable on their own or as seeds of a search.

Each returns a :class:`~evoprune.space.Candidate` of the given space that meets its budget::

    from evoprune.baselines import flap, owl, shortgpt, sleb, uniform

    seeds = [uniform(space), shortgpt(space, pruner), flap(space, pruner, calib_ids)]
    study.enqueue_trial(space.params_of(seeds[1]))                # Optuna samplers
    EvolutionarySampler(init=seeds)                               # evolution

* :func:`uniform`: every non-frozen block compressed alike.
* :func:`shortgpt` (block influence) and :func:`sleb` (greedy calibration loss,
  :func:`calibration_loss`): drop whole blocks.
* :func:`flap` (:func:`flap_scores`): FLAP's fluctuation scores -> non-uniform widths.
* :func:`owl` (:func:`owl_scores`, :func:`owl_allocation`): OWL's outlier-weighed per-block sparsity.
* Wanda-sp and FLAP with bias compensation as published (:func:`structured_pruner`: a pruner whose kept
  units are the metric's best; :func:`with_zero_biases`, :func:`input_means`, :func:`compensated`: FLAP's
  bias compensation through transformers' ``attention_bias`` / ``mlp_bias``).

The room uses ``space`` (candidates, budgets), ``evaluators`` (the one next-token NLL rule) and a
:class:`~evoprune.pruning.Pruner` passed in by the caller; nothing here knows about samplers or storage.
"""

from ._baselines import calibration_loss, flap, flap_scores, owl, owl_allocation, owl_scores, shortgpt, sleb, uniform
from ._structured import compensated, input_means, structured_pruner, with_zero_biases

__all__ = [
    "calibration_loss",
    "compensated",
    "flap",
    "flap_scores",
    "input_means",
    "owl",
    "owl_allocation",
    "owl_scores",
    "shortgpt",
    "sleb",
    "structured_pruner",
    "uniform",
    "with_zero_biases",
]
