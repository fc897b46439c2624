"""Issue 23 point 6: explicit-class loads of every export kind are exact or fail loudly.

``LlamaForCausalLM.from_pretrained(export)`` (or any stock class of the architecture: the base
model, sequence/token classification, question answering) ignores ``model_type``, so the guard of
the Auto classes does not apply. In a fresh process that never imports evoprune, each stock class
must either raise, or give exactly evoprune's hidden states (and logits, for the causal LM).
Classes whose base-model prefix is not ``model`` (``LlamaForQuestionAnswering``: ``transformer``)
load no causal-LM checkpoint at all, not even the dense model's, and are left out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import sibling_module
from tiny_models import ARCHS, tiny_model

from evoprune.pruning import Pruner, load_pruned

_auto = sibling_module(__file__, "test_export_auto")
calib, candidates = _auto.calib, _auto.candidates

EXACT = 1e-5

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, transformers
    from transformers.models.auto import modeling_auto as ma
    from safetensors.torch import load_file
    torch.set_num_threads(1)
    jobs = json.loads(sys.argv[1])
    mappings = ["MODEL_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
                "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"]
    report = {}
    for job in jobs:
        want = load_file(job["expected"])
        ids = torch.tensor(job["ids"])
        for mapping in mappings:
            name = getattr(ma, mapping).get(job["dense_type"])
            if name is None:
                continue
            cls = getattr(transformers, name)
            key = job["name"] + " " + name
            if cls.base_model_prefix != "model":  # e.g. LlamaForQuestionAnswering ("transformer"): it loads no
                report[key] = {"skipped": cls.base_model_prefix}  # causal-LM checkpoint, not even the dense one
                continue
            try:
                model = cls.from_pretrained(job["dir"]).eval()
            except Exception as exc:
                report[key] = {"loud": f"{type(exc).__name__}: {str(exc)[:200]}"}
                continue
            with torch.no_grad():
                out = model.base_model(ids).last_hidden_state
                diff = float((out - want["hidden"]).abs().max()) if out.shape == want["hidden"].shape else float("inf")
                if "CausalLM" in name:
                    logits = model(ids).logits
                    diff = max(diff, float((logits - want["logits"]).abs().max())
                               if logits.shape == want["logits"].shape else float("inf"))
            report[key] = {"diff": diff}
    report["evoprune imported"] = "evoprune" in sys.modules
    print("REPORT " + json.dumps(report))
    """
)


def test_explicit_stock_classes_load_every_export_kind_exactly_or_fail(tmp_path):
    from safetensors.torch import save_file

    ids = calib(n=2, seq_len=10, seed=5)
    jobs = []
    for arch in ARCHS:
        model = tiny_model(arch)
        pruner = Pruner(model, calib())
        kinds = dict(candidates(pruner.spec))
        for kind, cand in kinds.items():
            name = f"{arch}-{kind}"
            out_dir = pruner.export(cand, tmp_path / name)
            ours = load_pruned(out_dir).eval()
            with torch.no_grad():
                expected = {"hidden": ours.base_model(ids).last_hidden_state.contiguous(),
                            "logits": ours(ids).logits.contiguous()}
            save_file(expected, str(tmp_path / f"{name}.expected.safetensors"))
            cfg = json.loads((out_dir / "config.json").read_text())
            jobs.append(dict(name=name, dir=str(out_dir), ids=ids.tolist(),
                             dense_type=cfg["evoprune"]["dense_model_type"],
                             expected=str(tmp_path / f"{name}.expected.safetensors")))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=900, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT "))[len("REPORT "):])
    assert report.pop("evoprune imported") is False
    skipped = sorted(k for k, v in report.items() if "skipped" in v)
    report = {k: v for k, v in report.items() if "skipped" not in v}
    wrong = {k: v for k, v in report.items() if "loud" not in v and not v["diff"] <= EXACT}
    assert not wrong, sorted(wrong)  # loaded, but not evoprune's model: silently wrong
    for key, v in report.items():  # a dropped sublayer at full width used to load with random weights
        if "attn_dropped" in key or "mlp_dropped" in key:
            assert "loud" in v, (key, v)
    loud = sorted(k for k, v in report.items() if "loud" in v)
    print(f"{len(report)} loads: {len(loud)} refused, {len(report) - len(loud)} exact; {len(skipped)} skipped "
          f"(a base-model prefix other than 'model': {sorted({k.split()[1] for k in skipped})})")


def test_placeholders_leave_evoprune_loading_and_the_file_modes_alone(tmp_path):
    """load_pruned reads an export with placeholders exactly (they are ignored), and every file of the
    export has one mode (point 7: model.safetensors was 0600 while the rest were 0644)."""
    model = tiny_model("llama")
    pruner = Pruner(model, calib())
    cand = candidates(pruner.spec)["attn_dropped"]
    out = pruner.export(cand, tmp_path / "x")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["model.layers.1.self_attn.o_proj.weight"] == (1,)
    ids = calib(n=2, seq_len=10, seed=5)
    with pruner.applied(cand), torch.no_grad():
        applied = model(ids).logits
    with torch.no_grad():
        assert (load_pruned(out)(ids).logits - applied).abs().max() <= EXACT
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes
