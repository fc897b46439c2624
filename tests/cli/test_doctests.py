"""The runnable examples in the package's docstrings (every listed module must have some)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = (
    "evoprune.space",
    "evoprune.space._candidate",
    "evoprune.space._cost",
    "evoprune.space._space",
    "evoprune.space._sparsity",
    "evoprune.space._archs",
    "evoprune.space._moves",
    "evoprune.space._levels",
    "evoprune.space._mode",
    "evoprune.pruning._adapters",
    "evoprune.evaluators._tokens",
    "evoprune.evaluators._offsets",
    "evoprune.evaluators._base",
    "evoprune.evaluators._kl",
    "evoprune.evaluators._cost",
    "evoprune.evaluators._pipeline",
    "evoprune.baselines._baselines",
    "evoprune.search._config",
    "evoprune.search._evolution",
    "evoprune.search._objectives",
    "evoprune.study._pareto",
    "evoprune.search._recorder",
    "evoprune.search._runtime",
    "evoprune.search._trials",
    "evoprune.search._surrogate",
    "evoprune.search._presets",
    "evoprune.search._config_parts",
    "evoprune.study._study",
    "evoprune.study._status",
    "evoprune.data._sources",
    "evoprune._optuna_private",
    "evoprune.storage._schema",
    "evoprune.storage._engine",
    "evoprune.storage._owner",
    "evoprune.storage._database",
    "evoprune.storage._values",
    "evoprune.storage._tables",
    "evoprune._fingerprint",
    "evoprune._paths",
    "evoprune._validate",
    "evoprune._stop",
    "evoprune.pruning._auto",
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
