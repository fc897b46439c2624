"""evoprune: compress pretrained causal language models by evolutionary architecture search.

The public API is small; everything else lives in the subpackages, whose imports flow one way:
``evoprune.space`` (pure values) <- ``evoprune.pruning`` <- ``evoprune.evaluators``;
``evoprune.data`` (reference corpus and models, token sources); ``evoprune.storage``
(persistence only); ``evoprune.search`` (configs, runtime, samplers, driver) and
``evoprune.baselines`` use them; ``evoprune.study`` (the study facade: create/load, Pareto front,
status) drives search and storage; ``evoprune.report`` reads studies::

    >>> import evoprune
    >>> c = evoprune.Candidate(layers=(evoprune.LayerConfig(num_kv_heads=2, q_per_kv=2, mlp_channels=64),))
    >>> evoprune.Candidate.from_json(c.to_json()) == c
    True

Names are imported lazily, so ``import evoprune`` stays cheap (no torch import). It does install
a post-import hook (``evoprune._transformers_hook``): once transformers' config registry is imported
(or at once, if it already is), ``evoprune.register_auto_classes()`` runs, so plain
``AutoModelForCausalLM.from_pretrained(export_dir)`` loads evoprune exports.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # space
    "Candidate": "evoprune.space",
    "LayerConfig": "evoprune.space",
    "SearchSpace": "evoprune.space",
    "Budget": "evoprune.space",
    "CostModel": "evoprune.space",
    # pruning
    "Pruner": "evoprune.pruning",
    "load_pruned": "evoprune.pruning",
    "register_auto_classes": "evoprune.pruning",
    # search
    "StudyConfig": "evoprune.search",
    "Searcher": "evoprune.search",
    "plan": "evoprune.study",
    "EvolutionarySampler": "evoprune.search",
    # study
    "create_study": "evoprune.study",
    "load_study": "evoprune.study",
    "delete_study": "evoprune.study",
    "EvoStudy": "evoprune.study",
}

__all__ = ["__version__", *_EXPORTS]

#: study verbs that rooms above :mod:`evoprune.study` provide (``EvoStudy.<verb>`` -> ``"module:function"``).
#: This package is the composition root (like the CLI it may name every room); the study room looks its
#: verbs up here and never imports those rooms itself: ``study.report(...)`` is ``evoprune.report.write_report``.
STUDY_VERBS: dict[str, str] = {"report": "evoprune.report:write_report"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'evoprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


from ._transformers_hook import install as _install_transformers_hook  # noqa: E402  (no torch import)

_install_transformers_hook()
