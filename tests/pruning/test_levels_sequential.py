"""Sequential SparseGPT inputs in the level database (``level_inputs: sequential``): block ``i``'s
Hessians at level ``s`` come from the calibration inputs through blocks ``0 .. i-1`` compressed at ``s``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import sibling_module
from tiny_models import tiny_model

from evoprune.pruning import LevelSettings, Pruner, levels_from_space
from evoprune.pruning._obs import sparsegpt
from evoprune.space import Candidate, LayerConfig, SearchSpace

LEVELS = (0.0, 0.5, 0.75)


def _ids(n: int = 8, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (n, seq), generator=torch.Generator().manual_seed(seed))


def _space(spec, inputs="sequential"):
    return SearchSpace.from_model(spec, attention=None, mlp=False, sparsity_levels=LEVELS,
                                  sparsity_method="sparsegpt", level_inputs=inputs)


def _at(spec, sparsity_by_block: dict[int, float]) -> Candidate:
    return Candidate(layers=tuple(
        LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv, mlp_channels=spec.intermediate_size,
                    sparsity=sparsity_by_block.get(i, 0.0)) for i in range(spec.num_layers)))


def test_space_option_flows_into_the_database_key_and_json():
    spec = Pruner(tiny_model("llama"), _ids()).spec
    seq, dense = _space(spec), _space(spec, "dense")
    assert seq.to_dict()["level_inputs"] == "sequential" and "level_inputs" not in dense.to_dict()
    assert SearchSpace.from_dict(seq.to_dict()) == seq
    assert levels_from_space(seq).inputs == "sequential" and levels_from_space(dense).inputs == "dense"
    assert levels_from_space(seq).key()["inputs"] == "sequential" and "inputs" not in levels_from_space(dense).key()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_first_layer_equal_later_layers_differ_and_match_an_independent_sparsegpt(arch, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(arch)
    ids = _ids()
    pruner = Pruner(model, ids)
    spec = pruner.spec
    pruner.use_levels(levels_from_space(_space(spec, "dense")), cache_dir=tmp_path)
    dense_digest = pruner.strategy.db.digest
    dense_db = {i: {k: v.clone() for k, v in pruner.strategy.db.load(i).items()} for i in range(spec.num_layers)}
    settings = levels_from_space(_space(spec))
    pruner.use_levels(settings, cache_dir=tmp_path)
    db = pruner.strategy.db
    assert db.digest != dense_digest and db.key["inputs"] == "sequential"
    for name, t in db.load(0).items():  # layer 0 sees the same (dense) inputs
        assert torch.equal(t, dense_db[0][name]), name
    for i in range(1, spec.num_layers):  # later layers see the compressed earlier ones
        assert any(not torch.equal(t, dense_db[i][n]) for n, t in db.load(i).items()), i

    # independent: block 1 at level s = the SparseGPT of block 1's inputs under the candidate with block 0 at s
    level = 0.5
    refs = pruner.strategy.live.refs[1]
    a = pruner.strategy.live.adapter
    groups = pruner.strategy._groups(1)
    first = {"attn_in": a.qkv or a.q, "o_in": a.o, "mlp_in": a.gate_up or a.gate, "down_in": a.down}
    hs: dict[str, torch.Tensor] = {}
    handles = []
    for group, name in first.items():
        def fn(module, args, group=group):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            hs[group] = hs[group] + x.T @ x if group in hs else x.T @ x
        handles.append(refs.linears[name].register_forward_pre_hook(fn))
    with pruner.applied(_at(spec, {0: level})), torch.no_grad():
        for start in range(0, ids.shape[0], pruner.strategy.live.calib_batch_size):
            model(ids[start : start + pruner.strategy.live.calib_batch_size])
    for h in handles:
        h.remove()
    stored = db.load(1)
    for name, group in groups.items():
        w = refs.weight[name].detach().float()
        parts = [sparsegpt(p, hs[group].float(), level, blocksize=settings.blocksize, percdamp=settings.percdamp,
                           selection=settings.selection)
                 for p in w.split(pruner.strategy._row_parts(name), 0)]
        want = torch.cat(parts)
        got = stored[f"{name}@s{level!r}"]
        assert torch.equal(got != 0, want != 0), name  # the same mask
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (name, (got - want).abs().max())  # float32 sums


def test_bad_combinations_are_one_line_errors_at_space_construction():
    spec = Pruner(tiny_model("llama"), _ids()).spec
    for opts, match in (({"sparsity_method": "wanda"}, "needs sparsity_method 'sparsegpt'"),
                        ({"sparsity_method": None}, "needs sparsity_method 'sparsegpt'"),
                        ({"sparsity_method": "sparsegpt", "width_method": "obs"}, "not supported with sequential"),
                        ({"sparsity_method": "sparsegpt", "level_inputs": "chained"}, "level_inputs must be one of")):
        kw = {"attention": None, "mlp": False, "sparsity_levels": LEVELS, "level_inputs": "sequential", **opts}
        with pytest.raises(ValueError, match=match) as err:
            SearchSpace.from_model(spec, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="obs is not supported with sequential"):
        LevelSettings(sparsity_method="sparsegpt", width_method="obs", inputs="sequential")
    with pytest.raises(ValueError, match="level inputs must be one of"):
        LevelSettings(inputs="chained")


_BUILD = textwrap.dedent("""
    import json, os, sys, time
    import torch
    sys.path.insert(0, {tests!r})
    from tiny_models import tiny_model
    from evoprune.pruning import Pruner, LevelSettings
    from evoprune.pruning import _levels
    root, kill_at, slow = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    compute = _levels.LevelStrategy._compute
    def patched(self, i, hs, levels=None):
        if i == kill_at:
            os._exit(9)  # killed halfway through the build
        time.sleep(slow)
        return compute(self, i, hs, levels)
    _levels.LevelStrategy._compute = patched
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=5)
    ids = torch.randint(3, 97, (8, 24), generator=torch.Generator().manual_seed(0))
    pruner = Pruner(model, ids)
    settings = LevelSettings(sparsity_method="sparsegpt", sparsity={{0: (0.5, 0.7), 1: (0.5,), 3: (0.5, 0.7), 4: (0.7,)}},
                             inputs="sequential", dtype="float16")
    pruner.use_levels(settings, cache_dir=root)
    print(json.dumps(pruner.strategy.db.built_layers))
""")


_levels_tests = sibling_module(__file__, "test_levels")
_files = _levels_tests._files  # the database folder's files by name


def _build(root: Path, kill_at: int = -1, slow: float = 0.0, *, wait: bool = True):
    return _levels_tests._build(root, kill_at, slow, wait=wait, script=_BUILD)


def test_killed_sequential_build_resumes_from_stored_layers_to_byte_identical_files(tmp_path):
    rc, out, err = _build(tmp_path / "whole")
    assert rc == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1]) == [0, 1, 3, 4]
    rc, _, _ = _build(tmp_path / "resumed", kill_at=3)  # layers 0 and 1 finished, 3 killed
    assert rc == 9
    assert sorted(p for p in _files(tmp_path / "resumed") if p.endswith(".safetensors")) == [
        "layer-0000.safetensors", "layer-0001.safetensors"]
    rc, out, err = _build(tmp_path / "resumed")
    assert rc == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1]) == [3, 4]  # re-propagated through the stored 0 and 1
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")


def test_two_sequential_builders_wait_for_each_other_and_build_every_layer_once(tmp_path):
    procs = [_build(tmp_path / "db", slow=0.4, wait=False) for _ in range(2)]
    built = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        built.append(json.loads(out.splitlines()[-1]))
    assert sorted(built[0] + built[1]) == [0, 1, 3, 4]  # each layer computed by exactly one of them
    rc, _, err = _build(tmp_path / "single")
    assert rc == 0, err[-2000:]
    assert _files(tmp_path / "db") == _files(tmp_path / "single")


def test_sequential_inputs_with_width_genes_store_narrow_levels_and_round_trip(tmp_path):
    """Sliced widths compose with sequential SparseGPT: the narrower o_proj / down_proj levels are
    computed from the same per-level inputs (block 0's equal the dense-input build's)."""
    model = tiny_model("llama")
    pruner = Pruner(model, _ids())
    spec = pruner.spec

    def space(inputs):
        return SearchSpace.from_model(spec, attention="kv_groups", mlp_step=24, sparsity_levels=LEVELS,
                                      sparsity_method="sparsegpt", level_inputs=inputs)

    pruner.use_levels(levels_from_space(space("dense")), cache_dir=tmp_path)
    dense0, dense1 = ({k: v.clone() for k, v in pruner.strategy.db.load(i).items()} for i in (0, 1))
    seq = space("sequential")
    pruner.use_levels(levels_from_space(seq), cache_dir=tmp_path)
    stored0 = pruner.strategy.db.load(0)
    narrow = [k for k in stored0 if "@c" in k and "@s" in k]
    assert narrow and set(stored0) == set(dense0)
    for k in narrow:
        assert torch.allclose(stored0[k], dense0[k], atol=1e-6), k
    stored1 = pruner.strategy.db.load(1)
    assert any(not torch.allclose(stored1[k], dense1[k], atol=1e-6) for k in narrow)  # later inputs differ
    ids = _ids(n=2, seq=12, seed=5)
    for seed in range(3):
        cand = seq.random(seed)
        with pruner.applied(cand):
            applied = model(ids).logits
        small = pruner.materialize(cand)
        assert (small(ids).logits - applied).abs().max() < 1e-5
        nonzeros = sum(int((p != 0).sum()) for n, p in small.named_parameters() if ".layers." in n)
        assert nonzeros <= seq.cost(cand, "nonzero_params")
