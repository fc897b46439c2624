"""The level database (on disk, resumable, two builders at once, checked) and the level strategy
(SparseGPT / Wanda / magnitude sparsity and OBS widths applied, reverted, materialized and exported)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import sibling_module
from tiny_models import tiny_model

from evoprune.pruning import LevelDB, LevelDBError, LevelSettings, Pruner, levels_from_space
from evoprune.space import Candidate, LayerConfig, SearchSpace

TESTS = Path(__file__).resolve().parents[1]
ROUND_TRIP_ARCHS = ("llama", "qwen2", "qwen3", "phi3")


def _ids(n: int = 8, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (n, seq), generator=torch.Generator().manual_seed(seed))


_strategy_tests = sibling_module(__file__, "test_strategy")
_state, _assert_state = _strategy_tests._state, _strategy_tests._assert_state  # a strategy's whole footprint


# -- the database as a store ----------------------------------------------------------------------
def test_store_load_memory_mapped_with_storage_dtype(tmp_path):
    t = {"a@s0.5": torch.randn(5, 7), "b": torch.arange(6.0).view(2, 3)}
    for dtype, torch_dtype in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        db = LevelDB(tmp_path, {"model": "m", "calibration": "c", "method": "x"}, 3, dtype=dtype)
        db.build([0, 2], lambda i: {k: v + i for k, v in t.items()})
        assert db.done(0) and not db.done(1) and db.done(2)
        got = db.load(2)
        assert got["a@s0.5"].dtype == torch_dtype and torch.equal(got["a@s0.5"], (t["a@s0.5"] + 2).to(torch_dtype))
        got["b"].add_(1)  # copy-on-write: the file does not change
        again = LevelDB(tmp_path, {"model": "m", "calibration": "c", "method": "x"}, 3, dtype=dtype).load(2)
        assert torch.equal(again["b"], (t["b"] + 2).to(torch_dtype))
        elements = 2 * sum(v.numel() for v in t.values())
        assert elements * torch_dtype.itemsize <= db.nbytes <= elements * torch_dtype.itemsize + 2 * 256
    memory = LevelDB(None, {"k": 1}, 1)
    memory.build([0], lambda i: t)
    assert torch.equal(memory.load(0)["b"], t["b"]) and memory.info()["path"] is None


def test_corrupt_file_is_detected_and_rebuilt(tmp_path):
    calls = []

    def compute(i):
        calls.append(i)
        return {"w": torch.full((4, 4), float(i))}

    db = LevelDB(tmp_path, {"k": "v"}, 2)
    db.build([0, 1], compute)
    f = db.path / "layer-0001.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF  # same size, flipped bits: the checksum catches it
    f.write_bytes(bytes(raw))
    db2 = LevelDB(tmp_path, {"k": "v"}, 2)
    assert db2.build([0, 1], compute) == [1] and calls == [0, 1, 1]
    assert torch.equal(db2.load(1)["w"], torch.full((4, 4), 1.0))
    f.write_bytes(f.read_bytes()[:-8])  # truncated: the size check catches it even without verify
    assert not db2.done(1)
    with pytest.raises(LevelDBError, match="missing or truncated"):
        LevelDB(tmp_path, {"k": "v"}, 2).load(1)


def test_foreign_manifest_and_unwritable_folder_are_one_line_errors(tmp_path):
    db = LevelDB(tmp_path, {"model": "a", "calibration": "c"}, 1)
    db.build([0], lambda i: {"w": torch.ones(2)})
    manifest = json.loads((db.path / "manifest.json").read_text())
    manifest["calibration"] = "other"
    (db.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LevelDBError, match=r"built for another calibration \(fingerprint mismatch\); delete"):
        LevelDB(tmp_path, {"model": "a", "calibration": "c"}, 1)
    blocked = tmp_path / "a-file"  # the cache folder cannot be made (also as root)
    blocked.write_text("")
    with pytest.raises(LevelDBError, match="cannot write the level database .* writable folder") as err:
        LevelDB(blocked, {"k": 1}, 1).build([0], lambda i: {"w": torch.ones(2)})
    assert "\n" not in str(err.value)
    with pytest.raises(LevelDBError, match="dtype must be one of"):
        LevelDB(tmp_path, {"k": 1}, 1, dtype="int8")


# -- building in real processes -------------------------------------------------------------------
_BUILD = textwrap.dedent("""
    import json, os, sys, time
    import torch
    sys.path.insert(0, {tests!r})
    from tiny_models import tiny_model
    from evoprune.pruning import Pruner, LevelSettings
    from evoprune.pruning import _levels
    root, kill_at, slow = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    compute = _levels.LevelStrategy._compute
    def patched(self, i, hs):
        if i == kill_at:
            os._exit(9)  # killed halfway through the build
        time.sleep(slow)
        return compute(self, i, hs)
    _levels.LevelStrategy._compute = patched
    model = tiny_model("llama", num_hidden_layers=6)
    ids = torch.randint(3, 97, (8, 24), generator=torch.Generator().manual_seed(0))
    pruner = Pruner(model, ids)
    n = pruner.spec.num_layers
    settings = LevelSettings(sparsity_method="sparsegpt", width_method="obs", sparsity={{i: (0.5,) for i in range(n)}},
                             mlp={{i: (48,) for i in range(n)}}, heads={{i: ((2, 2),) for i in range(n)}})
    pruner.use_levels(settings, cache_dir=root)
    print(json.dumps(pruner.strategy.db.built_layers))
""")


def _build(root: Path, kill_at: int = -1, slow: float = 0.0, *, wait: bool = True, script: str = _BUILD):
    """Run a database build (``script``: a template with ``{tests}``) in a fresh process; ``kill_at``: the
    layer at which it dies (``os._exit``), ``slow``: seconds per layer."""
    cmd = [sys.executable, "-c", script.format(tests=str(TESTS)), str(root), str(kill_at), str(slow)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _files(root: Path) -> dict[str, bytes]:
    (db,) = [p for p in root.iterdir() if p.is_dir()]
    return {p.name: p.read_bytes() for p in sorted(db.iterdir()) if p.suffix in (".safetensors", ".json")}


def test_killed_build_resumes_to_byte_identical_files(tmp_path):
    rc, out, err = _build(tmp_path / "whole")
    assert rc == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1]) == list(range(6))
    kill_at = random.Random(os.getpid()).randrange(1, 6)
    rc, _, _ = _build(tmp_path / "resumed", kill_at=kill_at)
    assert rc == 9
    assert len([p for p in _files(tmp_path / "resumed") if p.endswith(".safetensors")]) == kill_at
    rc, out, err = _build(tmp_path / "resumed")
    assert rc == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1]) == list(range(kill_at, 6))  # the finished layers were kept
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")


def test_two_processes_building_at_once_build_every_layer_once(tmp_path):
    procs = [_build(tmp_path / "db", slow=0.3, wait=False) for _ in range(2)]
    built = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        built.append(json.loads(out.splitlines()[-1]))
    assert sorted(built[0] + built[1]) == list(range(6))  # each layer computed by exactly one of them
    rc, out, err = _build(tmp_path / "single")
    assert _files(tmp_path / "db") == _files(tmp_path / "single")


# -- the strategy --------------------------------------------------------------------------------
def _sparse_space(spec, pattern_2_4=False, method="sparsegpt"):
    levels = (0.0, 0.5) if pattern_2_4 else (0.0, 0.25, 0.5, 0.75)
    return SearchSpace.from_model(spec, attention=None, mlp=False, sparsity_levels=levels,
                                  sparsity_granularity="linear", pattern_2_4=pattern_2_4, sparsity_method=method)


def _width_space(spec, method="wanda", width="obs"):
    return SearchSpace.from_model(spec, attention="kv_groups", mlp_step=24, sparsity_levels=(0.0, 0.5),
                                  drop_mlp=True, width_method=width, sparsity_method=method)


@pytest.mark.parametrize("arch", ROUND_TRIP_ARCHS)
def test_applied_equals_materialized_reverts_exactly_and_counts_match(arch, tmp_path):
    model = tiny_model(arch)
    ids = _ids(seed=1)
    pruner = Pruner(model, _ids())
    snap = _state(model)
    for space in (_sparse_space(pruner.spec), _sparse_space(pruner.spec, pattern_2_4=True), _width_space(pruner.spec),
                  _width_space(pruner.spec, "sparsegpt"), _width_space(pruner.spec, "sparsegpt", "slice")):
        pruner.use_levels(levels_from_space(space), cache_dir=tmp_path)
        top = space.candidate_from_levels({g.name: g.top for g in space.genes})
        for cand in [space.random(seed) for seed in range(4)] + [top]:
            with pruner.applied(cand):
                applied = model(ids).logits
                masks = pruner.masks
                assert sum(int(m.sum()) for m in masks.values()) + sum(
                    p.numel() for p in pruner.trainable_parameters().values()
                    if not any(p is q for q in masks)) > 0
            _assert_state(model, snap)  # revert is bit for bit
            small = pruner.materialize(cand)
            assert torch.equal(small(ids).logits, applied) or (small(ids).logits - applied).abs().max() < 1e-5
            zeros_outside = sum(int((p == 0).sum()) for n, p in small.named_parameters() if ".layers." not in n)
            nonzeros = sum(int((p != 0).sum()) for p in small.parameters())
            assert nonzeros + zeros_outside == space.cost(cand, "nonzero_params")  # e.g. the padding row
    pruner.use_levels(None)
    _assert_state(model, snap)


def test_database_wanda_is_the_per_candidate_wanda_bit_for_bit(tmp_path):
    model = tiny_model("qwen2")
    ids = _ids(seed=2)
    pruner = Pruner(model, _ids())
    space = _sparse_space(pruner.spec, method="wanda")
    cands = [space.random(seed) for seed in range(3)]
    plain = []
    for cand in cands:
        with pruner.applied(cand):
            plain.append(model(ids).logits)
    pruner.use_levels(levels_from_space(space), cache_dir=tmp_path)
    for cand, want in zip(cands, plain):
        with pruner.applied(cand):
            assert torch.equal(model(ids).logits, want)


def test_sparsegpt_levels_reconstruct_better_than_wanda_on_a_model(tmp_path):
    """On the same candidate, the stored SparseGPT weights follow the dense logits more closely."""
    model = tiny_model("llama", num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    ids = _ids(n=32, seq=32, seed=3)
    dense = model(ids[:4]).logits
    pruner = Pruner(model, ids)
    space = _sparse_space(pruner.spec)
    top = space.candidate_from_levels({g.name: g.top for g in space.genes})  # 75 % everywhere
    with pruner.applied(top):
        wanda = (model(ids[:4]).logits - dense).pow(2).mean()
    pruner.use_levels(levels_from_space(space), cache_dir=tmp_path)
    with pruner.applied(top):
        sgpt = (model(ids[:4]).logits - dense).pow(2).mean()
    assert sgpt < 0.9 * wanda  # random weights and tokens: the gap is small; the unit tests measure it


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_storage_keeps_the_exact_nonzero_counts(dtype, tmp_path):
    model = tiny_model("llama")
    pruner = Pruner(model, _ids())
    space = _sparse_space(pruner.spec)
    pruner.use_levels(levels_from_space(space, dtype=dtype), cache_dir=tmp_path)
    assert pruner.levels["dtype"] == dtype
    cand = space.random(5)
    with pruner.applied(cand):
        for p, mask in pruner.masks.items():
            assert p.dtype == torch.float32 and torch.equal(mask, p != 0)
    small = pruner.materialize(cand)
    zeros_outside = sum(int((p == 0).sum()) for n, p in small.named_parameters() if ".layers." not in n)
    assert sum(int((p != 0).sum()) for p in small.parameters()) + zeros_outside == space.cost(cand, "nonzero_params")


def test_bad_levels_are_one_line_errors(tmp_path):
    model = tiny_model("llama")
    pruner = Pruner(model, _ids())
    spec = pruner.spec
    with pytest.raises(ValueError, match="sparsity_method must be one of"):
        SearchSpace.from_model(spec, attention=None, mlp=False, sparsity_levels=(0, .5), sparsity_method="obs")
    with pytest.raises(ValueError, match="width_method must be one of"):
        SearchSpace.from_model(spec, width_method="sparsegpt")
    with pytest.raises(ValueError, match="need mode 'static'"):
        SearchSpace.from_model(spec, mode="probe", width_method="obs")
    space = _sparse_space(spec)
    pruner.use_levels(levels_from_space(space), cache_dir=tmp_path)
    lc = LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv, mlp_channels=spec.intermediate_size,
                     sparsity=0.6)
    with pytest.raises(ValueError, match=r"sparsity 0.6 is not in the level database .* build the levels"):
        pruner.apply(Candidate(layers=(lc,) * spec.num_layers))
    narrow = dataclasses.replace(lc, mlp_channels=48, sparsity=0.5)
    with pytest.raises(ValueError, match="the mlp width of this candidate is not in the level database"):
        pruner.apply(Candidate(layers=(narrow,) * spec.num_layers))
    assert not pruner.is_applied
    with pytest.raises(ValueError, match="need calibration tokens"):
        Pruner(tiny_model("llama")).use_levels(levels_from_space(space))


def test_exports_reload_to_the_applied_logits_in_a_fresh_process(tmp_path):
    from helpers import RELOAD_SCRIPT
    from safetensors.torch import load_file

    ids, prompt = _ids(n=2, seq=12, seed=7), _ids(n=1, seq=4, seed=8)
    jobs, expected = [], {}
    for arch in ROUND_TRIP_ARCHS:
        model = tiny_model(arch)
        pruner = Pruner(model, _ids())
        for kind, space in (("sparsegpt", _sparse_space(pruner.spec)), ("obs", _width_space(pruner.spec))):
            pruner.use_levels(levels_from_space(space), cache_dir=tmp_path / "levels")
            cand = space.random(ROUND_TRIP_ARCHS.index(arch))
            out = pruner.export(cand, tmp_path / f"{arch}-{kind}")
            with pruner.applied(cand):
                expected[(arch, kind)] = model(ids).logits
            jobs.append(dict(dir=str(out), ids=ids.tolist(), prompt=prompt.tolist(),
                             out=str(tmp_path / f"{arch}-{kind}.safetensors")))
    proc = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=600, cwd=str(TESTS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (arch, kind), want in expected.items():
        got = load_file(str(tmp_path / f"{arch}-{kind}.safetensors"))
        assert (got["logits"] - want).abs().max() < 1e-5, (arch, kind)


def test_nemotron_nas_export_holds_the_database_weights(tmp_path):
    from evoprune.pruning._nemotron import deci_reference_model

    model = tiny_model("llama")
    pruner = Pruner(model, _ids())
    space = _width_space(pruner.spec)
    pruner.use_levels(levels_from_space(space), cache_dir=tmp_path / "levels")
    spec = pruner.spec
    lc = LayerConfig(num_kv_heads=2, q_per_kv=spec.q_per_kv, mlp_channels=48, sparsity=0.5)
    cand = Candidate(layers=(lc,) * spec.num_layers)
    small = pruner.materialize(cand)
    plain = Pruner(tiny_model("llama"), _ids()).materialize(cand)
    ids = _ids(n=1, seq=8, seed=9)
    with torch.no_grad():
        want = small(ids).logits
        assert (plain(ids).logits - want).abs().max() > 1e-3  # the OBS weights are not the sliced ones
        out = pruner.export(cand, tmp_path / "nas", format="nemotron-nas")
        assert (deci_reference_model(out)(ids).logits - want).abs().max() < 1e-5


def test_switching_back_to_a_database_reuses_it(tmp_path):
    pruner = Pruner(tiny_model("llama"), _ids())
    space = _sparse_space(pruner.spec)
    pruner.use_levels(levels_from_space(space), cache_dir=tmp_path)
    first = pruner.strategy
    pruner.use_levels(None)
    assert pruner.levels is None and type(pruner.strategy).__name__ == "StaticStrategy"
    pruner.use_levels(levels_from_space(space), cache_dir=tmp_path)
    assert pruner.strategy is first and first.db.built_layers == list(range(pruner.spec.num_layers))
    pruner.use_levels(levels_from_space(space, sparsity_method="magnitude"), cache_dir=tmp_path)
    assert pruner.strategy is not first and pruner.levels["sparsity_method"] == "magnitude"


def test_a_full_disk_while_building_is_one_line_and_leaves_no_partial_file(tmp_path):
    script = textwrap.dedent(f"""
        import resource, sys
        import torch
        from evoprune.pruning import LevelDB, LevelDBError
        db = LevelDB({str(tmp_path)!r}, {{"k": 1}}, 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))  # files over 4 KiB: EFBIG
        try:
            db.build([0, 1], lambda i: {{"w": torch.ones(64, 64)}})
        except LevelDBError as exc:
            print("ERROR", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ERROR")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stderr[-2000:]
    assert "cannot write the level database" in lines[0] and "free disk space" in lines[0]
    (db,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in db.iterdir() if not p.name.endswith(".lock")) == ["manifest.json"]


@pytest.mark.parametrize("width", ["slice", "obs"])
def test_sparsegpt_with_widths_is_sparsegpt_of_the_width_levels_weights(width, tmp_path):
    """How width and sparsity genes compose: a narrower down_proj / o_proj at a sparsity level holds
    SparseGPT of the width level's weight (sliced or OBS) with the Hessian of its kept inputs; the
    narrower q/k/v/gate/up rows are the stored dense-width SparseGPT rows."""
    from evoprune.pruning._calib import calibration_pass
    from evoprune.pruning._obs import obs_columns, sparsegpt

    model = tiny_model("llama", num_hidden_layers=2)
    calib = _ids(n=16, seq=24, seed=4)
    pruner = Pruner(model, calib)
    spec = pruner.spec
    space = _width_space(spec, "sparsegpt", width)
    settings = levels_from_space(space)
    pruner.use_levels(settings, cache_dir=tmp_path)
    mlp = model.model.layers[1].mlp
    w_down, w_up = mlp.down_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone()
    xs = []
    calibration_pass(model, calib, [(mlp.down_proj, lambda x: xs.append(x.reshape(-1, x.shape[-1]).double()))],
                     batch_size=pruner.strategy.live.calib_batch_size)
    x = torch.cat(xs)
    hessian = (x.T @ x).float()
    (mlp_gene,) = [g for g in space.genes if g.name == "L1.mlp"]
    mc = mlp_gene.levels[1]
    lc = LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv, mlp_channels=mc, sparsity=0.5)
    dense = LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv, mlp_channels=spec.intermediate_size)
    small = pruner.materialize(Candidate(layers=(dense, lc)))
    kept = torch.arange(mc)
    base = obs_columns(w_down, hessian, kept) if width == "obs" else w_down[:, :mc]
    want = sparsegpt(base, hessian[:mc, :mc], 0.5)
    got = small.model.layers[1].mlp.down_proj.weight.detach()
    assert got.shape == (spec.hidden_size, mc)
    assert torch.equal(got != 0, want != 0) and torch.allclose(got, want, rtol=1e-3, atol=1e-5)
    # gate/up rows: the first mc rows of the dense-width SparseGPT weight (rows are independent)
    up_sparse = sparsegpt(w_up, pruner.strategy._hessians([1])[(1, "mlp_in")], 0.5)
    assert torch.allclose(small.model.layers[1].mlp.up_proj.weight.detach(), up_sparse[:mc], rtol=1e-3, atol=1e-5)
    # Wanda with the same widths would leave down_proj's kept weights unchanged; SparseGPT updates them
    assert not torch.equal(got[got != 0], w_down[:, :mc][got != 0])


def test_settings_nbytes_is_what_the_database_stores(tmp_path):
    """``LevelSettings.nbytes`` (what ``evoprune plan`` reports, from shapes) is the stored tensors' bytes,
    for sparsity levels, OBS widths and SparseGPT levels of the narrower widths."""
    pruner = Pruner(tiny_model("qwen2", num_hidden_layers=2), _ids())
    for space, dtype in ((_sparse_space(pruner.spec), "float16"), (_width_space(pruner.spec, "sparsegpt"), "float32"),
                         (_width_space(pruner.spec, "wanda", "slice"), "bfloat16")):
        settings = levels_from_space(space, dtype=dtype)
        pruner.use_levels(settings, cache_dir=tmp_path)
        db = pruner.strategy.db
        stored = sum(t.numel() * t.element_size() for i in settings.layers() for t in db.load(i).values())
        assert settings.nbytes(pruner.spec) == stored > 0 or not settings.layers()
        assert stored <= db.nbytes <= stored + 4096 * len(settings.layers())


def test_space_default_is_sparsegpt_only_where_there_is_sparsity():
    spec = Pruner(tiny_model("llama"), _ids()).spec
    assert SearchSpace.from_model(spec, sparsity_levels=(0, .5)).sparsity_method == "sparsegpt"
    assert SearchSpace.from_model(spec, pattern_2_4=True).sparsity_method == "sparsegpt"
    assert SearchSpace.from_model(spec, mlp_step=24).sparsity_method is None  # nothing to store
    assert not SearchSpace.from_model(spec, mlp_step=24).uses_levels
    for method in (None, "wanda", "sparsegpt"):
        space = SearchSpace.from_model(spec, sparsity_levels=(0, .5), sparsity_method=method)
        again = SearchSpace.from_dict(json.loads(json.dumps(space.to_dict())))
        assert again == space and again.sparsity_method == method  # an explicit null stays null


def test_hessians_are_collected_in_chunks_under_the_bound(tmp_path, monkeypatch):
    """A build collects at most HESSIAN_BYTES of Hessians per calibration pass; the stored levels do not
    depend on the chunking."""
    from evoprune.pruning import _levels

    passes = []
    hessians = _levels.LevelStrategy._hessians

    def counted(self, layers):
        passes.append(list(layers))
        return hessians(self, layers)

    monkeypatch.setattr(_levels.LevelStrategy, "_hessians", counted)
    model = tiny_model("llama", num_hidden_layers=5)
    pruner = Pruner(model, _ids())
    space = _width_space(pruner.spec, "sparsegpt")
    pruner.use_levels(levels_from_space(space), cache_dir=tmp_path / "one")
    assert passes == [list(range(5))]
    whole = {i: pruner.strategy.db.load(i) for i in range(5)}
    s = pruner.spec
    per_layer = 4 * (2 * s.hidden_size ** 2 + (s.num_heads * s.head_dim) ** 2 + s.intermediate_size ** 2)
    monkeypatch.setattr(_levels, "HESSIAN_BYTES", 2 * per_layer + 1)
    passes.clear()
    pruner.use_levels(levels_from_space(space), cache_dir=tmp_path / "chunked")
    assert passes == [[0, 1], [2, 3], [4]]
    for i in range(5):
        chunked = pruner.strategy.db.load(i)
        assert chunked.keys() == whole[i].keys()
        assert all(torch.allclose(chunked[k], whole[i][k], atol=1e-5) for k in chunked)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_cuda_builds_its_levels_there_and_matches_the_cpu_build(tmp_path):  # pragma: no cover
    """The Hessians, SparseGPT and OBS run on the model's device; the stored levels match a CPU build."""
    cpu = Pruner(tiny_model("llama"), _ids())
    space = _width_space(cpu.spec, "sparsegpt")
    cpu.use_levels(levels_from_space(space), cache_dir=tmp_path / "cpu")
    gpu = Pruner(tiny_model("llama").cuda(), _ids())
    gpu.use_levels(levels_from_space(space), cache_dir=tmp_path / "cuda")
    for i in range(cpu.spec.num_layers):
        a, b = cpu.strategy.db.load(i), gpu.strategy.db.load(i)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    cand = space.random(0)
    ids = _ids(n=2, seq=12, seed=6)
    with cpu.applied(cand), gpu.applied(cand):
        assert (cpu.model(ids).logits - gpu.model(ids.cuda()).logits.cpu()).abs().max() < 1e-3
