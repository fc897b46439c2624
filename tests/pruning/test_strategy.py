"""The pruning room's seams: one strategy per mode behind one interface, one calibration pass,
module-level imports that flow one way, and space reached through its public ``__init__`` only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_model

from evoprune.pruning import Pruner, calibration_pass, get_adapter
from evoprune.pruning._pruner import STRATEGIES
from evoprune.pruning._static import StaticStrategy
from evoprune.pruning._strategy import Strategy
from evoprune.space import PRUNING_MODES, Candidate, LayerConfig, ProbeSettings

PRUNING_DIR = Path(__file__).resolve().parents[2] / "pruning"
SETTINGS = {"static": None, "probe": ProbeSettings(seq_ratio=0.5, batch_ratio=0.5, momentum=0.9)}


def _ids(n: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 97, (n, seq), generator=torch.Generator().manual_seed(seed))


def _state(model: torch.nn.Module) -> dict[str, object]:
    """Everything a strategy may touch: parameters (value and storage), per-instance forwards, hooks."""
    out: dict[str, object] = {}
    for name, mod in model.named_modules():
        for pname, p in mod._parameters.items():
            out[f"{name}.{pname}"] = None if p is None else (id(p), p.data_ptr(), p.detach().clone())
        out[f"{name}:forward"] = mod.__dict__.get("forward")
        out[f"{name}:hooks"] = (len(mod._forward_pre_hooks), len(mod._forward_hooks))
        out[f"{name}:features"] = (getattr(mod, "in_features", None), getattr(mod, "out_features", None))
    return out


def _assert_state(model: torch.nn.Module, before: dict[str, object]) -> None:
    now = _state(model)
    assert now.keys() == before.keys()
    for key, value in before.items():
        if isinstance(value, tuple) and len(value) == 3 and isinstance(value[2], torch.Tensor):
            assert now[key][:2] == value[:2] and torch.equal(now[key][2], value[2]), key
        else:
            assert now[key] == value, key


def test_every_mode_has_one_strategy_that_satisfies_the_interface():
    assert set(STRATEGIES) == set(PRUNING_MODES)
    pruner = Pruner(tiny_model("llama"), _ids(4, 16, 0))
    assert pruner.mode == "static" and type(pruner.strategy) is STRATEGIES["static"]
    for mode in PRUNING_MODES:
        cls = STRATEGIES[mode]
        assert cls.mode == mode
        pruner.set_mode(mode, SETTINGS[mode])
        assert type(pruner.strategy) is cls and isinstance(pruner.strategy, Strategy)
        assert pruner.strategy.settings == SETTINGS[mode]
        assert (pruner.probe is pruner.strategy) == (mode == "probe")
    probe = pruner.strategy
    pruner.set_mode("static")
    pruner.set_mode("probe", SETTINGS["probe"])
    assert pruner.strategy is probe  # same settings: reused, its calibration history computed once
    with pytest.raises(ValueError, match="only used with mode='probe'"):
        pruner.set_mode("static", SETTINGS["probe"])


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("mode", PRUNING_MODES)
def test_a_strategy_alone_applies_and_reverts_exactly(arch, mode):
    """Without the pruner's structural changes: a strategy's apply changes the model, its revert restores
    every parameter (value and storage), forward, hook and feature count bit for bit."""
    pruner = Pruner(tiny_model(arch), _ids(4, 16, 0))
    live, spec, model = pruner._live, pruner.spec, pruner.model
    ids = _ids(3, 12, 1)
    with torch.no_grad():
        dense = model(ids).logits
    before = _state(model)
    strategy = STRATEGIES[mode](live, SETTINGS[mode])
    full = dict(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv)
    attn_sparse = {"linear_sparsity": {"q": 0.5, "o": 0.25}} if mode == "static" else {}
    cand = Candidate(layers=(
        LayerConfig(**full, mlp_channels=spec.intermediate_size, **attn_sparse),  # attention only (static)
        LayerConfig(**full, mlp_channels=40),
        LayerConfig(**full, mlp_channels=spec.intermediate_size),  # dense: left alone
        LayerConfig(**full, mlp_channels=8),
    ))
    pruned = list(live.pruned_sublayers(cand))
    assert [(i, s) for i, s, _ in pruned] == ([(0, "attn")] if attn_sparse else []) + [(1, "mlp"), (3, "mlp")]
    strategy.check(cand)
    for _ in range(2):
        strategy.apply(cand)
        with torch.no_grad():
            pruned_logits = model(ids).logits
        assert not torch.allclose(pruned_logits, dense)
        assert bool(strategy.masks) == bool(attn_sparse)
        strategy.revert()
        _assert_state(model, before)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, dense)
    strategy.revert()  # a second revert is a no-op
    _assert_state(model, before)


def test_the_pruner_applies_its_structure_around_the_strategy_and_the_probe_refuses_sparsity():
    pruner = Pruner(tiny_model("qwen3"), _ids(4, 16, 0))
    spec, model = pruner.spec, pruner.model
    before = _state(model)
    half = LayerConfig(num_kv_heads=spec.num_kv_heads // 2, q_per_kv=spec.q_per_kv, mlp_channels=48)
    dropped = LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0)
    no_attn = LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=48)
    cand = Candidate(layers=(half, dropped, no_attn, half))
    for mode in PRUNING_MODES:
        pruner.set_mode(mode, SETTINGS[mode])
        with pruner.applied(cand):
            assert model.config.num_hidden_layers == 3
            assert len(model.get_submodule(pruner.adapter.layers)) == 3
            with torch.no_grad():
                model(_ids(2, 8, 2))
        _assert_state(model, before)
        assert model.config.num_hidden_layers == spec.num_layers
    sparse = Candidate(layers=(LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv,
                                           mlp_channels=48, sparsity=0.5),) * spec.num_layers)
    with pytest.raises(ValueError, match="no sparsity masks"):
        pruner.apply(sparse)  # probe mode (the last one set): refused before anything changes
    assert not pruner.is_applied
    _assert_state(model, before)
    with pytest.raises(ValueError, match="no fixed smaller model"):
        pruner.materialize(cand)


class _Halved(StaticStrategy):
    """A strategy with other weights in the static slices (as a level database's stored ones would be)."""

    def _kept(self, part, lc, pattern):
        weight, mask = super()._kept(part, lc, pattern)
        return weight * 0.5, mask


def test_a_strategy_with_its_own_weights_in_the_static_slices_applies_materializes_and_reverts():
    pruner = Pruner(tiny_model("phi3"), _ids(4, 16, 0))
    spec, model = pruner.spec, pruner.model
    ids = _ids(2, 10, 4)
    with torch.no_grad():
        dense = model(ids).logits
    before = _state(model)
    cand = Candidate(layers=tuple(LayerConfig(num_kv_heads=2, q_per_kv=1 + i % 2, mlp_channels=48 + 8 * i,
                                              sparsity=0.25 * (i % 2)) for i in range(spec.num_layers)))
    with torch.no_grad(), pruner.applied(cand):
        static = model(ids).logits
    pruner._strategy = _Halved(pruner._live)  # what set_mode does for a registered mode
    with torch.no_grad():
        with pruner.applied(cand):
            halved = model(ids).logits
            assert pruner.masks  # the sparse parts keep their masks
        small = pruner.materialize(cand)
        assert torch.allclose(small(ids).logits, halved, atol=1e-5, rtol=0)
    assert not torch.allclose(halved, static)
    _assert_state(model, before)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def test_calibration_pass_hands_every_batch_to_the_hooks_and_removes_them():
    model = tiny_model("llama")
    a = get_adapter(model)
    down = getattr(getattr(model.get_submodule(a.layers)[1], a.mlp), a.down)
    ids = _ids(5, 10, 3)
    seen: list[torch.Tensor] = []
    calibration_pass(model, ids, [(down, lambda x: seen.append(x.detach().clone()))], batch_size=2)
    assert [x.shape[0] for x in seen] == [2, 2, 1]
    expected = []
    h = down.register_forward_pre_hook(lambda m, args: expected.append(args[0].detach().clone()))
    with torch.no_grad():
        model(ids)
    h.remove()
    assert torch.allclose(torch.cat(seen), expected[0], atol=1e-6, rtol=0)
    assert not down._forward_pre_hooks

    def boom(x: torch.Tensor) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        calibration_pass(model, ids, [(down, boom)], batch_size=2)
    assert not down._forward_pre_hooks  # removed on error too


def _imports(path: Path) -> tuple[set[str], list[str], list[str]]:
    """``(module-level imports of sibling modules, evoprune imports inside functions, private space imports)``."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    deferred: list[str] = []
    private: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        names = [node.module] if node.module else [n.name for n in node.names]
        if node.level == 2 and node.module and node.module.startswith("space."):
            private.append(node.module)
        if node not in tree.body:
            deferred.append(f"{path.name}:{node.lineno} {'.' * node.level}{node.module or ''}")
        elif node.level == 1:
            top.update(n for n in names if n and n.startswith("_"))
    return top, deferred, private


def test_pruning_imports_flow_one_way_at_module_level():
    """No cycle between pruning's modules, no deferred import of evoprune code (third-party imports may
    be deferred to keep `import evoprune.pruning` cheap), and space only through its public __init__."""
    graph, deferred, private = {}, [], []
    for path in sorted(PRUNING_DIR.glob("*.py")):
        top, d, p = _imports(path)
        graph[path.stem] = top
        deferred += d
        private += p
    assert deferred == [] and private == []
    order: list[str] = []
    visiting: set[str] = set()

    def visit(mod: str) -> None:
        if mod in order:
            return
        assert mod not in visiting, f"import cycle through {mod}"
        visiting.add(mod)
        for dep in sorted(graph.get(mod, ())):
            visit(dep)
        visiting.discard(mod)
        order.append(mod)

    for mod in sorted(graph):
        visit(mod)
    position = {m: k for k, m in enumerate(order)}
    # the strategies sit below the pruner, and loading (which builds pruners) above it
    assert position["_strategy"] < position["_static"] < position["_pruner"] < position["_load"] < position["_verify"]
    assert position["_probe"] < position["_pruner"] and "_pruner" not in graph["_probe"] | graph["_static"]
