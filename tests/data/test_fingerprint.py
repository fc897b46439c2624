"""The one home of the fingerprints (``evoprune._fingerprint``) and of the cache root.

Study databases store model and data fingerprints and compare them on resume,
so these values are pinned: they were computed with ``evoprune.evaluators.
model_fingerprint`` / ``ids_fingerprint`` and ``evoprune._corpus.token_fingerprint``
before the helpers moved, and an old database must keep resuming. If a pin
fails, the change breaks every existing study: revert it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evoprune._fingerprint import directory_sha256, ids_fingerprint, model_fingerprint
from evoprune._paths import cache_root


class _Config:
    def to_dict(self):
        # _name_or_path and transformers_version are left out of the digest; dtype is not
        return {"model_type": "toy", "hidden_size": 8, "_name_or_path": "/somewhere",
                "transformers_version": "9.9", "dtype": "float32"}


def _toy(with_config: bool = True) -> torch.nn.Module:
    """Embedding, Linear, LayerNorm and BatchNorm (buffers) with fixed weights; no RNG."""
    m = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 5), torch.nn.LayerNorm(5),
                            torch.nn.BatchNorm1d(5))
    with torch.no_grad():
        for i, (_, p) in enumerate(m.named_parameters()):
            p.copy_(torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.37 + i).reshape(p.shape).to(p.dtype))
        m[3].running_mean.copy_(torch.linspace(-1, 1, 5))
    if with_config:
        m.config = _Config()
    return m


def _big() -> torch.nn.Module:
    """15000 weights: more than the 4096 sampled values."""
    big = torch.nn.Linear(300, 50)
    with torch.no_grad():
        big.weight.copy_(torch.cos(torch.arange(15000, dtype=torch.float64) * 0.01).reshape(50, 300).float())
        big.bias.copy_(torch.arange(50, dtype=torch.float32) / 7)
    return big


def test_model_fingerprint_is_pinned():
    assert model_fingerprint(_toy()) == "7bceb54ec47fd67b"
    assert model_fingerprint(_toy(False)) == "a093f8189113539a"
    assert model_fingerprint(_toy(False).to(torch.float16)) == "385ab1c4ad8f5048"
    assert model_fingerprint(_big()) == "5197e0d1301bbd02"
    assert model_fingerprint(_big(), samples_per_tensor=256) == "257c2489c550b1d7"
    tied = _toy()
    tied.add_module("head", torch.nn.Linear(8, 11, bias=False))
    tied.head.weight = tied[0].weight  # a tied parameter counts under both names
    assert model_fingerprint(tied) == "ab87bad6b1cf9ea3"


def test_ids_fingerprint_is_pinned():
    ids = torch.arange(1000) % 97
    assert ids_fingerprint(ids) == "2367ac2fae46aa0c"
    assert ids_fingerprint(ids.to(torch.int32)) == "2367ac2fae46aa0c"  # values, not dtype
    assert ids_fingerprint(ids.view(10, 100)) == "2367ac2fae46aa0c"  # values, not shape
    assert ids_fingerprint(torch.zeros(0, dtype=torch.long)) == "e3b0c44298fc1c14"
    # the whole digest, as stored in reference-model records (evoprune.data.tokenized_split)
    assert ids_fingerprint(ids, chars=64) == "2367ac2fae46aa0c9e2d6de5e7029f4b15c93054ad44e2d6b58b910f3849d45a"


def test_directory_sha256_is_pinned(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "config.json").write_text('{"a": 1}\n')
    (tmp_path / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 3)
    (tmp_path / "b.txt").write_text("")
    assert directory_sha256(tmp_path) == "900695df7693ae2c5877c1792d5c3dbd87c3c229b96eec36594917746ebb9a92"
    assert directory_sha256(tmp_path / "config.json") == (
        "8ea90d2c3d83acaa071f658bf67901139e9612db7c58a55ad4b6baf3a48049cb")


def test_every_user_calls_the_one_copy():
    from evoprune import evaluators
    from evoprune.data import tokenized_split  # noqa: F401  (imports without search/storage)
    from evoprune.evaluators import _base, _tokens
    from evoprune.pruning import _importance

    assert evaluators.model_fingerprint is model_fingerprint is _importance.model_fingerprint
    assert evaluators.ids_fingerprint is ids_fingerprint is _tokens.ids_fingerprint
    assert evaluators.default_cache_dir is cache_root
    ids = torch.arange(64).view(4, 16)
    assert _importance.data_fingerprint(ids) == ids_fingerprint(ids)
    assert _importance.data_fingerprint(None) == "none"
    ctx = _base.EvalContext(eval_ids=torch.arange(100))
    assert ctx.data_fingerprint == "76dd2a8258e0b093"  # sha256(ids_fingerprint(eval) + "|-")[:16]


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOPRUNE_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root() == (tmp_path / "env").resolve()
    assert cache_root(tmp_path / "given") == (tmp_path / "given").resolve()
    monkeypatch.delenv("EVOPRUNE_CACHE_DIR")
    import platformdirs

    assert cache_root() == Path(platformdirs.user_cache_dir("evoprune")).resolve()
