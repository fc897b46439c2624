"""Fitted linear replacements: the closed-form fit, an exactly linear MLP, apply/revert, round trips."""

from __future__ import annotations

import pytest
import torch

import evoprune  # noqa: F401  (registers the auto classes)
from evoprune.pruning import Pruner, load_pruned
from evoprune.pruning._linear import LinearFits, fit_linear, low_rank
from evoprune.space import Candidate, LayerConfig, SearchSpace
from helpers import bits
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(n=16, seq=32, seed=0):
    return torch.randint(3, 97, (n, seq), generator=torch.Generator().manual_seed(seed))


def _mixed(spec, rank_low=8):
    d, h = spec.dense_layer(), spec.hidden_size
    return Candidate(layers=(
        d,
        LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0, block_linear=h),
        LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=spec.intermediate_size // 2, attn_linear=rank_low),
        LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv, mlp_channels=0, mlp_linear=h),
        LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0),  # dropped
        d,
    ))


def test_closed_form_fit_equals_lstsq_on_the_recorded_inputs_and_outputs():
    model = tiny_model("llama", num_hidden_layers=2)
    pruner = Pruner(model, _ids())
    fits = LinearFits(model, pruner.adapter, pruner._refs, _ids(), key={"t": 1}, folder=None, ridge=0.0)
    recorded = {}

    def hook(mod, args, out):
        recorded.setdefault("x", []).append(args[0].reshape(-1, args[0].shape[-1]).double())
        recorded.setdefault("y", []).append(out.reshape(-1, out.shape[-1]).double())

    handle = pruner._refs[1].mlp.register_forward_hook(hook)
    try:
        fits.ensure([(1, "mlp")])
    finally:
        handle.remove()
    x, y = torch.cat(recorded["x"]), torch.cat(recorded["y"])
    want = torch.linalg.lstsq(x, y).solution
    got = fits._fits[(1, "mlp")]["A"].double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    resid = ((y - x @ want) ** 2).sum() / (y**2).sum()
    assert fits.residual_share(1, "mlp") == pytest.approx(float(resid), rel=1e-3, abs=1e-6)
    # plain algebra: fit_linear(X^T X, X^T Y) is lstsq; the low-rank pair is the reduced-rank regression
    g = torch.Generator().manual_seed(1)
    xa, ya = torch.randn(300, 12, generator=g, dtype=torch.float64), torch.randn(300, 12, generator=g, dtype=torch.float64)
    a = fit_linear(xa.T @ xa, xa.T @ ya, ridge=0.0)
    torch.testing.assert_close(a, torch.linalg.lstsq(xa, ya).solution)
    u, v = low_rank(a, xa.T @ xa, 12)
    torch.testing.assert_close(u @ v, a)
    u3, v3 = low_rank(a, xa.T @ xa, 3)
    fit3 = ((ya - xa @ u3 @ v3) ** 2).sum()
    yhat = xa @ a
    svd = torch.linalg.svd(yhat, full_matrices=False)  # best rank-3 approximation of the fitted outputs
    best3 = svd.U[:, :3] @ torch.diag(svd.S[:3]) @ svd.Vh[:3]
    assert float(fit3) == pytest.approx(float(((ya - best3) ** 2).sum()), rel=1e-6)


def test_an_exactly_linear_mlp_replaced_by_its_fit_gives_the_dense_logits():
    """gate = 0 weights + constant bias: silu(b) * up(x) through down is linear in the normed input."""
    model = tiny_model("llama", num_hidden_layers=3, mlp_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.zero_()
            layer.mlp.gate_proj.bias.fill_(1.0)
            layer.mlp.up_proj.bias.zero_()
            layer.mlp.down_proj.bias.zero_()
    ids = _ids(32, 32)
    x = _ids(2, 24, seed=5)
    with torch.no_grad():
        dense = model(x).logits
    pruner = Pruner(model, ids, linear_ridge=0.0)
    spec = pruner.spec
    cand = Candidate(layers=tuple(LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv, mlp_channels=0,
                                              mlp_linear=spec.hidden_size) for _ in range(3)))
    with pruner.applied(cand), torch.no_grad():
        replaced = model(x).logits
    torch.testing.assert_close(replaced, dense, rtol=1e-4, atol=1e-4)
    assert all(pruner.linear_residual_share(i, "mlp") < 1e-6 for i in range(3))


def test_apply_reverts_exactly_and_the_cost_model_counts_the_materialized_parameters():
    model = tiny_model("llama", num_hidden_layers=6)
    snap = {n: bits(p) for n, p in model.state_dict().items()}
    pruner = Pruner(model, _ids())
    spec = pruner.spec
    x = _ids(2, 16, seed=3)
    with torch.no_grad():
        dense = model(x).logits
    permuted = {n: bits(p) for n, p in model.state_dict().items()}
    cand = _mixed(spec)
    with pruner.applied(cand) as live, torch.no_grad():
        applied = live(x).logits
        assert not torch.allclose(applied, dense)
        trainable = pruner.trainable_parameters()
        assert any("A.weight" in n for n in trainable) and any("U.weight" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(x).logits, dense)
    assert {n: bits(p) for n, p in model.state_dict().items()}.keys() == snap.keys()
    assert all(torch.equal(bits(p), permuted[n]) for n, p in model.state_dict().items())
    small = pruner.materialize(cand)
    space = SearchSpace.from_model(spec, attention=None, mlp_step=spec.intermediate_size // 2, drop_attention=True,
                                   drop_mlp=True, drop_blocks=True, linear_ranks=(spec.hidden_size, 8))
    numel = sum(p.numel() for p in small.parameters())
    assert numel == space.cost_model.params(cand)
    with torch.no_grad():
        assert torch.equal(small(x).logits, applied)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3"])
def test_round_trip_applied_materialized_exported_reloaded(arch, tmp_path):
    import transformers

    model = tiny_model(arch, num_hidden_layers=6)
    pruner = Pruner(model, _ids(), cache_dir=tmp_path / "cache" / "importance")
    cand = _mixed(pruner.spec)
    x = _ids(2, 16, seed=4)
    with pruner.applied(cand), torch.no_grad():
        applied = model(x).logits
    with torch.no_grad():
        materialized = pruner.materialize(cand)(x).logits
    out = pruner.export(cand, tmp_path / "out")
    with torch.no_grad():
        reloaded = load_pruned(out)(x).logits
        auto = transformers.AutoModelForCausalLM.from_pretrained(out)
        via_auto = auto(x).logits
    assert torch.equal(materialized, applied) and torch.equal(reloaded, applied) and torch.equal(via_auto, applied)
    assert type(auto).__name__.startswith("Evoprune")  # refused by stock transformers (evoprune_<type>)
    assert auto.generate(x, max_new_tokens=4, do_sample=False).shape == (2, 20)
    # the fits are on disk, keyed by the model and calibration fingerprints: a second pruner reads them
    files = sorted((tmp_path / "cache" / "levels").glob("*/layer-*.safetensors"))
    assert [f.name for f in files] == [f"layer-{i:04d}.safetensors" for i in range(6)]  # every block, one pass
    again = Pruner(tiny_model(arch, num_hidden_layers=6), _ids(), cache_dir=tmp_path / "cache" / "importance")
    assert all(again._linear.has(i, p) for i, p in Pruner.linear_parts(cand))


def test_bad_linear_input_for_the_pruner_is_one_line():
    model = tiny_model("llama", num_hidden_layers=6)
    pruner = Pruner(model, None)
    with pytest.raises(ValueError, match="give the Pruner calib_ids"):
        pruner.apply(_mixed(pruner.spec))
    assert not pruner.is_applied
    h = pruner.spec.hidden_size
    bad = Candidate(layers=(LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0, block_linear=h + 1),)
                    + (pruner.spec.dense_layer(),) * 5)
    with pytest.raises(ValueError, match="rank larger than the hidden size"):
        pruner.apply(bad)


def test_linear_levels_are_refused_in_probe_mode_before_anything_is_applied():
    model = tiny_model("llama", num_hidden_layers=6)
    pruner = Pruner(model, _ids())
    pruner.set_mode("probe")
    with pytest.raises(ValueError, match="linear levels need the static mode"):
        pruner.apply(_mixed(pruner.spec))
    assert not pruner.is_applied


def test_a_study_searches_linear_levels_and_heals_its_export_by_distillation(reference_tiny, tmp_path):
    """End to end: a study config with linear_ranks, a KL-healed fine-tune stage, an export healed by KL."""
    config = {
        "model": "reference:tiny",
        "calibration": {"num_sequences": 4, "seq_len": 32},
        "space": {"attention": None, "mlp": False, "drop_blocks": True, "linear_ranks": [64]},
        "budget": {"metric": "params", "max_ratio": 0.8},
        "stages": [{"name": "s1", "evaluators": ["kl"], "eval_tokens": 256, "seq_len": 32, "promote": {"top_k": 1}},
                   {"name": "s2", "evaluators": ["kl"], "eval_tokens": 256, "seq_len": 32, "finetune_tokens": 256,
                    "finetune": {"loss": "kl", "lr": 1e-4}}],
        "sampler": {"name": "evolutionary", "options": {"offspring": 2}},
        "objectives": ["kl"],
    }
    study = evoprune.create_study(config, storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    try:
        study.run(n_trials=6)
        runtime = study.runtime if study.runtime is not None else study.build_runtime()
        space = runtime.space
        assert space.linear_ranks == (64,)
        best = study.pareto_front()[0].number
        assert space.contains(study.candidate(best)) and space.satisfies_budget(study.candidate(best))
        art = study.export(best, tmp_path / "out", runtime=runtime, finetune_tokens=512, finetune_loss="kl")
        assert art.metrics["healing"]["finetune"]["loss"] == "kl"
    finally:
        study.close()


def test_linear_fits_live_in_the_level_database_and_a_corrupt_one_is_fitted_again(tmp_path):
    """The fits are stored like compressed levels (LevelDB: manifest with the key, sha256 sidecars); a file
    that no longer matches its checksum is deleted and fitted again, never used."""
    import json

    cache = tmp_path / "cache" / "importance"
    cand = None
    pruner = Pruner(tiny_model("llama", num_hidden_layers=6), _ids(), cache_dir=cache)
    cand = _mixed(pruner.spec)
    x = _ids(2, 16, seed=5)
    with pruner.applied(cand), torch.no_grad():
        want = pruner.model(x).logits
    (folder,) = [p for p in (tmp_path / "cache" / "levels").iterdir() if p.is_dir()]
    assert json.loads((folder / "manifest.json").read_text())["kind"] == "linear_fits"
    victim = folder / "layer-0002.safetensors"
    data = bytearray(victim.read_bytes())
    data[-8:] = b"\x7f" * 8  # same size, other bytes: only the checksum can tell
    victim.write_bytes(bytes(data))
    again = Pruner(tiny_model("llama", num_hidden_layers=6), _ids(), cache_dir=cache)
    with again.applied(cand), torch.no_grad():
        got = again.model(x).logits
    assert torch.equal(got, want)
    assert victim.read_bytes() != bytes(data)  # refitted and stored again
