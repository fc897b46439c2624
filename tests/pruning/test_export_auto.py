"""Exports load exactly through plain transformers Auto classes, or fail loudly (never silently wrong).

Every candidate kind is exported for every tiny architecture, then loaded in fresh Python
processes (one per mode, each checking all exports): after ``import evoprune`` (before or after
transformers), plain ``AutoModelForCausalLM.from_pretrained`` must give ``load_pruned``'s logits;
in a process that never imports evoprune it must give the same logits or raise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tiny_models import ARCHS, tiny_model

from evoprune._fingerprint import model_fingerprint
from evoprune.pruning import Pruner, load_pruned
from evoprune.space import Candidate, LayerConfig, ModelSpec

TOL = 1e-5  # in-search (applied) vs reloaded
EXACT = 1e-6  # two loaders of the same checkpoint

# kinds that stock transformers builds exactly: they keep the dense model_type
STOCK_KINDS = ("block_drops", "sparsity", "2:4", "uniform_widths")
CUSTOM_KINDS = ("widths_per_layer", "q_per_group", "attn_dropped", "mlp_dropped", "linear")


def calib(n: int = 4, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n, seq_len), generator=g)


def candidates(spec: ModelSpec) -> dict[str, Candidate]:
    """One candidate per kind (tiny models have 4 layers, 4 KV heads x 2 queries, 96 channels)."""
    G, Q, I = spec.num_kv_heads, spec.q_per_kv, spec.intermediate_size
    full = LayerConfig(num_kv_heads=G, q_per_kv=Q, mlp_channels=I)
    n = spec.num_layers

    def with_layers(**at: LayerConfig) -> tuple[LayerConfig, ...]:
        return tuple(at.get(f"l{i}", full) for i in range(n))

    return {
        "widths_per_layer": Candidate(layers=with_layers(
            l0=LayerConfig(num_kv_heads=2, q_per_kv=Q, mlp_channels=48),
            l2=LayerConfig(num_kv_heads=G, q_per_kv=Q, mlp_channels=72, sparsity=0.3))),
        "q_per_group": Candidate(layers=with_layers(l1=LayerConfig(num_kv_heads=G, q_per_kv=1, mlp_channels=I))),
        "attn_dropped": Candidate(layers=with_layers(l1=LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=I))),
        "mlp_dropped": Candidate(layers=with_layers(l2=LayerConfig(num_kv_heads=G, q_per_kv=Q, mlp_channels=0))),
        "block_drops": Candidate(layers=with_layers(
            l1=LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0),
            l3=LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0))),
        "sparsity": Candidate(layers=tuple(
            LayerConfig(num_kv_heads=G, q_per_kv=Q, mlp_channels=I, sparsity=0.5, linear_sparsity={"down": 0.3})
            for _ in range(n))),
        "2:4": Candidate(layers=tuple(
            LayerConfig(num_kv_heads=G, q_per_kv=Q, mlp_channels=I, sparsity=0.5) for _ in range(n)),
            sparsity_pattern="2:4"),
        # fitted linear maps (issue 26): a whole block full rank, an attention low rank, an MLP full rank
        "linear": Candidate(layers=with_layers(
            l0=LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=I, attn_linear=8),
            l1=LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0, block_linear=spec.hidden_size),
            l2=LayerConfig(num_kv_heads=G, q_per_kv=Q, mlp_channels=0, mlp_linear=spec.hidden_size))),
        # the same smaller widths everywhere: hidden 64 % 4 heads == 0, so every dense config accepts them
        "uniform_widths": Candidate(layers=tuple(
            LayerConfig(num_kv_heads=2, q_per_kv=Q, mlp_channels=48) for _ in range(n))),
    }


_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    mode, jobs = sys.argv[1], json.loads(sys.argv[2])
    if mode == "evoprune_first":
        import evoprune
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "import evoprune is not cheap"
        from transformers import AutoConfig, AutoModelForCausalLM
    elif mode == "transformers_first":
        from transformers import AutoConfig, AutoModelForCausalLM
        import evoprune
    else:
        from transformers import AutoConfig, AutoModelForCausalLM
    import torch
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    report = {}
    for job in jobs:
        ids = torch.tensor(job["ids"])
        try:
            config = AutoConfig.from_pretrained(job["dir"])
            model = AutoModelForCausalLM.from_pretrained(job["dir"])
        except Exception as exc:
            report[job["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out = {"auto": model(ids).logits.contiguous()}
        if mode == "evoprune_first":
            out["load_pruned"] = evoprune.load_pruned(job["dir"])(ids).logits.contiguous()
        save_file(out, job["out"])
        report[job["name"]] = {"config_class": type(config).__name__, "model_class": type(model).__name__}
    report["evoprune imported"] = "evoprune" in sys.modules
    print("REPORT " + json.dumps(report))
    """
)


def _run(mode: str, jobs: list[dict], root: Path) -> dict:
    out_jobs = [dict(job, out=str(root / f"{mode}-{job['name']}.safetensors")) for job in jobs]
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, mode, json.dumps(out_jobs)],
        capture_output=True, text=True, timeout=600, cwd=str(root),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT "))
    report = json.loads(line[len("REPORT "):])
    from safetensors.torch import load_file

    for job in out_jobs:
        if "error" not in report[job["name"]]:
            report[job["name"]]["logits"] = load_file(job["out"])
    return report


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every kind x architecture exported once, and loaded in one fresh process per mode."""
    root = tmp_path_factory.mktemp("auto-exports")
    ids = calib(n=2, seq_len=10, seed=5)
    jobs, expected = [], {}
    for arch in ARCHS:
        dense_fp = model_fingerprint(tiny_model(arch))
        model = tiny_model(arch)
        pruner = Pruner(model, calib())
        for kind, cand in candidates(pruner.spec).items():
            name = f"{arch}-{kind}"
            out_dir = pruner.export(cand, root / name)
            with pruner.applied(cand):
                applied = model(ids).logits
            expected[name] = dict(arch=arch, kind=kind, dir=out_dir, applied=applied, dense_fp=dense_fp, cand=cand)
            jobs.append(dict(name=name, dir=str(out_dir), ids=ids.tolist()))
    reports = {mode: _run(mode, jobs, root) for mode in ("evoprune_first", "no_evoprune")}
    # the other import order: Llama and Qwen3 suffice
    reports["transformers_first"] = _run(
        "transformers_first", [j for j in jobs if j["name"].startswith(("llama-", "qwen3-"))], root)
    return dict(expected=expected, reports=reports, ids=ids, root=root)


@pytest.mark.parametrize("mode", ["evoprune_first", "transformers_first"])
def test_with_evoprune_imported_plain_auto_loading_matches_load_pruned(exported, mode):
    report = exported["reports"][mode]
    reference = exported["reports"]["evoprune_first"]
    assert report["evoprune imported"]
    for name, exp in exported["expected"].items():
        if mode == "transformers_first" and exp["arch"] not in ("llama", "qwen3"):
            continue
        got = report[name]
        assert "error" not in got, f"{name}: {got.get('error')}"
        auto = got["logits"]["auto"]
        assert (auto - reference[name]["logits"]["load_pruned"]).abs().max() <= EXACT, name
        assert (auto - exp["applied"]).abs().max() <= TOL, name
        if exp["kind"] in CUSTOM_KINDS:
            assert got["model_class"].startswith("Evoprune"), (name, got["model_class"])
            assert got["config_class"].startswith("Evoprune"), (name, got["config_class"])


def test_without_evoprune_plain_auto_loading_is_exact_or_loud(exported):
    report = exported["reports"]["no_evoprune"]
    assert not report["evoprune imported"]
    reference = exported["reports"]["evoprune_first"]
    for name, exp in exported["expected"].items():
        got = report[name]
        if exp["kind"] in STOCK_KINDS:
            assert "error" not in got, f"{name} should load with stock transformers: {got.get('error')}"
        if "error" in got:
            assert f"evoprune_{exp['arch']}" in got["error"], (name, got["error"])
            continue
        assert (got["logits"]["auto"] - reference[name]["logits"]["load_pruned"]).abs().max() <= EXACT, name
    for name, exp in exported["expected"].items():  # every kind stock transformers cannot build is refused
        if exp["kind"] in CUSTOM_KINDS:
            assert "error" in report[name] and "does not recognize" in report[name]["error"], name


def test_model_type_and_fingerprint_are_recorded(exported):
    for name, exp in exported["expected"].items():
        cfg = json.loads((exp["dir"] / "config.json").read_text())
        want = exp["arch"] if exp["kind"] in STOCK_KINDS else f"evoprune_{exp['arch']}"
        assert cfg["model_type"] == want, name
        section = cfg["evoprune"]
        assert section["format_version"] == 2 and section["dense_model_type"] == exp["arch"]
        assert section["model_fingerprint"] == exp["dense_fp"], name
        assert Candidate.from_dict(section["candidate"]) == exp["cand"]
        if exp["kind"] == "uniform_widths":  # globals are the real widths, so any HF-config reader sees them
            assert (cfg["num_key_value_heads"], cfg["intermediate_size"]) == (2, 48)
        if exp["kind"] in CUSTOM_KINDS:
            assert cfg["architectures"] == [f"Evoprune{cfg['architectures'][0].removeprefix('Evoprune')}"]


def test_load_pruned_reads_format_1_exports(exported, tmp_path):
    """Exports written before the evoprune_<type> model types: dense model_type + per_layer_config."""
    import transformers

    ids = exported["ids"]
    for arch in ("llama", "qwen3"):
        for kind in ("attn_dropped", "widths_per_layer"):
            exp = exported["expected"][f"{arch}-{kind}"]
            old = tmp_path / f"{arch}-{kind}"
            shutil.copytree(exp["dir"], old)
            cfg = json.loads((old / "config.json").read_text())
            dense_cls = transformers.AutoModelForCausalLM._model_mapping[transformers.AutoConfig.for_model(arch).__class__]
            cfg["model_type"], cfg["architectures"] = arch, [dense_cls.__name__]
            cfg["evoprune"]["format_version"] = 1
            for key in ("dense_model_type", "model_fingerprint"):
                cfg["evoprune"].pop(key)
            (old / "config.json").write_text(json.dumps(cfg))
            model = load_pruned(old)
            assert type(model) is dense_cls and model.config.model_type == arch
            assert (model(ids).logits - exp["applied"]).abs().max() <= TOL


def test_load_pruned_refuses_a_newer_format(exported, tmp_path):
    exp = exported["expected"]["llama-attn_dropped"]
    newer = tmp_path / "newer"
    shutil.copytree(exp["dir"], newer)
    cfg = json.loads((newer / "config.json").read_text())
    cfg["evoprune"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="upgrade evoprune"):
        load_pruned(newer)


def test_materialized_model_is_the_registered_class_and_saves_like_an_export(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen3")
    pruner = Pruner(model, calib())
    cand = candidates(pruner.spec)["mlp_dropped"]
    small = pruner.materialize(cand)
    assert type(small).__name__ == "EvopruneQwen3ForCausalLM" and small.config.model_type == "evoprune_qwen3"
    assert isinstance(small, type(model))
    small.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = calib(seed=9)
    assert torch.equal(again(ids).logits, small(ids).logits)


def test_config_registry_hook_uses_a_transformers_private_that_still_exists():
    """The hook replaces CONFIG_MAPPING._extra_content (a plain dict in transformers); fail loudly if it changes."""
    import evoprune  # noqa: F401  (installs the hook)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert getattr(CONFIG_MAPPING._extra_content, "_evoprune_lazy", False)
    assert isinstance(CONFIG_MAPPING._extra_content, dict)
    assert "evoprune_phi3" in CONFIG_MAPPING and CONFIG_MAPPING["evoprune_phi3"].model_type == "evoprune_phi3"
    assert "evoprune_not_an_arch" not in CONFIG_MAPPING


def test_auto_module_docstring_examples():
    import doctest

    import evoprune.pruning._auto as auto

    result = doctest.testmod(auto, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_register_auto_classes_is_public_and_idempotent():
    import evoprune

    first = evoprune.register_auto_classes()
    assert set(first) >= {f"evoprune_{a}" for a in ARCHS}
    assert evoprune.register_auto_classes() == first


def test_export_on_a_full_disk_leaves_nothing_and_says_what_to_do(tmp_path):
    """A write that runs out of space (here: a file-size limit, EFBIG, in a subprocess) gives one clear
    error and leaves no half-written folder; the same export then succeeds into the same folder."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, sys
        import torch
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from tiny_models import tiny_model
        from evoprune.pruning import Pruner
        from evoprune.space import SearchSpace
        torch.manual_seed(0)
        model = tiny_model("llama")
        pruner = Pruner(model, torch.randint(3, 90, (2, 16)))
        cand = SearchSpace.from_model(model.config).random(0)
        out = {str(tmp_path / "export")!r}
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            pruner.export(cand, out)
        except OSError as exc:
            print("ERROR", exc)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        import os
        print("LEFT", sorted(os.listdir({str(tmp_path)!r})))
        print("AGAIN", pruner.export(cand, out))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.split(" ", 1)[0] in
                 ("ERROR", "LEFT", "AGAIN"))
    assert "free disk space" in lines["ERROR"] and "nothing was written" in lines["ERROR"]
    assert lines["LEFT"] == "[]"
    assert (tmp_path / "export" / "config.json").is_file()
