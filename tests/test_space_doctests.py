"""The runnable examples in evoprune.space's docstrings."""

import doctest
import importlib

import pytest

MODULES = ("evoprune.space", "evoprune.space._candidate", "evoprune.space._cost", "evoprune.space._space")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
