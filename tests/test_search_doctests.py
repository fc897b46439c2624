"""Run the docstring examples of evoprune.search."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["_baselines", "_config", "_evolution", "_pareto", "_recorder", "_runtime", "_searcher"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    module = importlib.import_module(f"evoprune.search.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
