"""One per-architecture registry: ``register_adapter`` alone adds an architecture everywhere."""

from __future__ import annotations

import dataclasses
import doctest
import subprocess
import sys

import pytest
import torch
import transformers

from tiny_models import ARCHS, tiny_config

import evoprune.space as space_pkg
from evoprune.pruning import ArchAdapter, Pruner, get_adapter, register_adapter, registered_model_types
from evoprune.space import ArchFacts, Budget, Candidate, CostModel, LayerConfig, ModelSpec, SearchSpace, get_arch
from evoprune.space import _archs

ALIAS = "evoprune_test_llama"


class AliasConfig(transformers.LlamaConfig):
    """Llama under another ``model_type``: an architecture evoprune has never heard of."""

    model_type = ALIAS


@pytest.fixture(autouse=True)
def _restore_registry(monkeypatch):
    monkeypatch.setattr(_archs, "_REGISTRY", dict(_archs._REGISTRY))
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)


def _alias_config(**overrides) -> AliasConfig:
    kw = tiny_config("llama").to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        kw.pop(key, None)
    kw.update(overrides)
    return AliasConfig(**kw)


def test_builtin_facts_live_in_one_registry():
    assert registered_model_types() == space_pkg.SUPPORTED_MODEL_TYPES == tuple(sorted(ARCHS))
    for arch in ARCHS:
        adapter = get_adapter(arch)
        assert get_arch(arch) is adapter and isinstance(adapter, ArchFacts)
        spec = ModelSpec.from_config(tiny_config(arch))
        assert (spec.fused_qkv, spec.fused_gate_up, spec.qk_norm) == (
            adapter.qkv is not None, adapter.gate_up is not None, bool(adapter.head_norms))
    assert get_arch("qwen2").qkv_bias and not get_arch("qwen2").o_bias
    assert get_arch("llama").qkv_bias is None  # read from config.attention_bias


def test_space_works_without_torch():
    code = ("import sys, evoprune.space as s; assert s.SUPPORTED_MODEL_TYPES == "
            f"{tuple(sorted(ARCHS))!r}; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_register_adapter_alone_adds_an_architecture():
    config = _alias_config(attention_bias=True, mlp_bias=True)
    with pytest.raises(ValueError, match="register_adapter adds one"):
        ModelSpec.from_config(config)
    with pytest.raises(ValueError, match="register_adapter adds one"):
        get_adapter(config)

    adapter = register_adapter(ArchAdapter(
        model_type=ALIAS, decoder_layer="transformers.models.llama.modeling_llama:LlamaDecoderLayer"))
    assert ALIAS in registered_model_types() and ALIAS in space_pkg.SUPPORTED_MODEL_TYPES
    assert get_adapter(config) is adapter

    spec = ModelSpec.from_config(config)
    assert (spec.qkv_bias, spec.o_bias, spec.mlp_bias) == (True, True, True)  # read from the config
    space = SearchSpace.from_model(config, mlp_step=32, budget=Budget(metric="params", max_ratio=0.8))
    cand = space.random(0)
    assert space.satisfies_budget(cand)

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.config.model_type == ALIAS
    cost = CostModel(spec)
    assert cost.params(spec.dense_candidate()) == sum(p.numel() for p in model.parameters())
    pruner = Pruner(model, None)
    layer = LayerConfig(num_kv_heads=2, q_per_kv=1, mlp_channels=40, sparsity=0.3)
    cand = Candidate(layers=(layer,) * spec.num_layers)
    small = pruner.materialize(cand)
    assert sum(p.numel() for p in small.parameters()) == cost.params(cand)
    ids = torch.randint(3, 97, (2, 8))
    with pruner.applied(cand):
        applied = model(ids).logits
    assert (small(ids).logits - applied).abs().max() <= 1e-5


def test_registration_conflicts_say_what_to_do():
    llama = get_adapter("llama")
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        register_adapter(dataclasses.replace(llama))
    with pytest.raises(ValueError, match="other facts.*replace=True"):
        _archs.register_arch(ArchFacts(model_type="qwen2", qkv_bias=False))
    with pytest.raises(TypeError, match="ArchAdapter"):
        register_adapter(ArchFacts(model_type="x"))
    with pytest.raises(ValueError, match="head_norms"):
        ArchAdapter(model_type="x", decoder_layer="m:C", head_norms=("q_norm",))
    with pytest.raises(TypeError):
        ArchAdapter(model_type="x", decoder_layer="m:C", fused_qkv=True)  # follows from qkv=
    replaced = register_adapter(dataclasses.replace(llama, mlp_bias=False), replace=True)
    assert get_arch("llama") is replaced and get_adapter("llama") is replaced


@pytest.mark.parametrize("name", ["evoprune.space._archs", "evoprune.space._sparsity", "evoprune.space._moves",
                                  "evoprune.space._levels", "evoprune.pruning._adapters"])
def test_docstring_examples_of_split_modules(name):
    import importlib

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
