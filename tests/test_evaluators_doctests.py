"""The runnable examples in evoprune.evaluators' docstrings."""

import doctest
import importlib

import pytest

MODULES = (
    "evoprune.evaluators._tokens",
    "evoprune.evaluators._base",
    "evoprune.evaluators._kl",
    "evoprune.evaluators._cost",
    "evoprune.evaluators._pipeline",
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
