"""Fixtures and helpers shared by the evaluator tests (no tests here).

Import the fixtures into a test module's namespace to use them::

    from test_evaluators_support import one_thread, ref_data, fresh_reference
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from evoprune.space import Candidate, LayerConfig, ModelSpec


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the 2 shared cores are faster without OpenMP contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclasses.dataclass
class RefData:
    path: Path
    tokenizer: object
    eval_ids: torch.Tensor
    train_ids: torch.Tensor
    fingerprint: str

    def model(self):
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(self.path).eval()


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


def candidate(spec: ModelSpec, *, mlp=None, kv=None, sparsity=0.0, drop=(), pattern="unstructured") -> Candidate:
    """All layers alike: ``mlp`` channels, ``kv`` KV heads (dense defaults); blocks in ``drop`` removed."""
    mlp = spec.intermediate_size if mlp is None else mlp
    kv = spec.num_kv_heads if kv is None else kv
    layers = []
    for i in range(spec.num_layers):
        if i in drop:
            layers.append(LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0))
        else:
            layers.append(LayerConfig(num_kv_heads=kv, q_per_kv=spec.q_per_kv, mlp_channels=mlp, sparsity=sparsity))
    return Candidate(layers=tuple(layers), sparsity_pattern=pattern)


def calib(ids: torch.Tensor, n: int = 8, seq_len: int = 64) -> torch.Tensor:
    return ids[: n * seq_len].view(n, seq_len)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes, for bit-for-bit comparisons."""
    return t.detach().contiguous().view(torch.uint8).clone()
