"""The runnable examples in evoprune.storage's docstrings."""

import doctest
import importlib

import pytest

MODULES = (
    "evoprune.storage._schema",
    "evoprune.storage._engine",
    "evoprune.storage._owner",
    "evoprune.storage._database",
    "evoprune.storage._study",
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
