"""bfloat16 / float16 end to end on CPU: a bf16 search ranks candidates like float32, exports in the
model's dtype (HF and GGUF), fine-tunes with fp32 optimizer state, and devices/dtypes a machine
cannot run fail in one line before anything loads (issue 28)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evoprune.search import StudyConfig, build_runtime
from evoprune._device import check_device, check_dtype, parse_devices, torch_dtype_name


def _config(tmp_path, dtype: str, **over):
    text = ("The quick brown fox jumps over the lazy dog. Shall I compare thee to a summer's day? "
            "Thou art more lovely and more temperate. ") * 40
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "valid.txt").write_text(text[::-1])
    return StudyConfig.from_dict(dict(
        model="reference:tiny", dtype=dtype,
        data={"source": "text", "train": [str(tmp_path / "train.txt")], "validation": [str(tmp_path / "valid.txt")]},
        calibration={"num_sequences": 4, "seq_len": 64},
        space={"attention": "kv_groups", "mlp_step": 16, "drop_blocks": True},
        budget={"metric": "params", "max_ratio": 0.7},
        stages=[{"name": "s1", "evaluators": ["kl"], "eval_tokens": 512, "seq_len": 64}],
        cache_dir=str(tmp_path / "cache"), **over,
    ))


@pytest.fixture(scope="module")
def runtimes(reference_tiny, tmp_path_factory):
    """The same study in float32 and in bfloat16 (built once for the module)."""
    d = tmp_path_factory.mktemp("dtype")
    return {dt: build_runtime(_config(d, dt)) for dt in ("float32", "bfloat16")}


def _stage1_kl(runtime, candidates):
    from evoprune.evaluators import KLToDense

    ctx = runtime.context.for_stage("s1", eval_tokens=512, seq_len=64)
    kl = KLToDense()
    kl.prepare(runtime.model, ctx)
    out = []
    for c in candidates:
        with runtime.pruner.applied(c):
            out.append(kl.evaluate(runtime.model, c, ctx).value)
    return np.array(out)


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_bfloat16_search_ranks_candidates_like_float32(runtimes):
    rt32, rt16 = runtimes["float32"], runtimes["bfloat16"]
    assert next(rt16.model.parameters()).dtype == torch.bfloat16
    assert next(rt32.model.parameters()).dtype == torch.float32
    assert rt16.fingerprints["model"] != rt32.fingerprints["model"]  # the dtype is part of what a study searched
    assert rt16.fingerprints["data"] == rt32.fingerprints["data"]
    # calibration statistics are accumulated in float32 whatever the model's dtype
    imp = rt16.pruner.importance
    assert imp.mlp_channel.dtype == torch.float32 and imp.input_norms["down_in"].dtype == torch.float32
    rng = np.random.default_rng(0)
    cands = []
    while len(cands) < 16:
        c = rt32.space.random(rng)
        if c.key not in {x.key for x in cands}:
            cands.append(c)
    kl32, kl16 = _stage1_kl(rt32, cands), _stage1_kl(rt16, cands)
    assert np.all(np.isfinite(kl16)) and np.all(kl16 > 0)
    assert _spearman(kl32, kl16) >= 0.95, (kl32, kl16)
    # the values themselves agree to bf16's precision over a few layers (stated tolerance: 10 % relative)
    assert np.max(np.abs(kl16 - kl32) / kl32) < 0.10
    # the dense model against itself: exactly 0 in bf16 too (KL's log-softmax runs in float32)
    assert _stage1_kl(rt16, [rt16.space.spec.dense_candidate()])[0] == 0.0


def test_bfloat16_export_keeps_the_dtype_and_reproduces_logits(runtimes, tmp_path):
    from gguf import GGUFReader
    from safetensors import safe_open

    from evoprune.pruning import load_pruned

    rt = runtimes["bfloat16"]
    cand = rt.space.random(np.random.default_rng(1))
    ids = rt.calib_ids[:2, :32]
    with rt.pruner.applied(cand), torch.inference_mode():
        want = rt.model(input_ids=ids).logits
    out = rt.pruner.export(cand, tmp_path / "hf", tokenizer=rt.tokenizer)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    again = load_pruned(out).eval()
    assert next(again.parameters()).dtype == torch.bfloat16
    with torch.inference_mode():
        got = again(input_ids=ids).logits
    assert torch.equal(got, want)
    for fmt in ("bf16", "f16"):
        g = rt.pruner.export(cand, tmp_path / f"gguf-{fmt}", tokenizer=rt.tokenizer, format="gguf", dtype=fmt)
        reader = GGUFReader(str(g / f"model-{fmt}.gguf"))
        types = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2 and t.shape[1] > 1}
        assert types == {"BF16" if fmt == "bf16" else "F16"}, types


def test_bfloat16_finetune_keeps_fp32_optimizer_state_and_restores_weights(runtimes):
    from evoprune.evaluators import finetune

    rt = runtimes["bfloat16"]
    cand = rt.space.random(np.random.default_rng(2))
    before = {k: v.clone() for k, v in rt.model.state_dict().items()}
    ctx = rt.context.for_stage("s1", eval_tokens=512, seq_len=64)
    states = []
    orig = torch.optim.AdamW.step

    def spy(self, *a, **k):
        r = orig(self, *a, **k)
        states.extend(s["exp_avg"].dtype for s in self.state.values())
        return r

    torch.optim.AdamW.step = spy
    try:
        with rt.pruner.applied(cand), finetune(rt.model, ctx, tokens=256, lr=1e-3, seq_len=64) as report:
            pass
    finally:
        torch.optim.AdamW.step = orig
    assert report.steps >= 1 and all(np.isfinite(report.losses))
    assert states and set(states) == {torch.float32}
    after = rt.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_devices_and_dtypes_a_machine_cannot_run_fail_in_one_line():
    assert check_device("cpu") == "cpu"
    assert check_dtype("bfloat16", "cpu") == "bfloat16"
    assert check_dtype("auto", "cpu", {"torch_dtype": "bfloat16"}) == "bfloat16"
    assert torch_dtype_name("auto", {}) == "float32"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device 'cuda:7' is not available: .*use device cpu") as e:
            check_device("cuda:7")
        assert "\n" not in str(e.value)
    else:  # pragma: no cover - GPU machines
        n = torch.cuda.device_count()
        with pytest.raises(ValueError, match=f"does not exist: this machine has {n} CUDA GPU"):
            check_device(f"cuda:{n}")
    with pytest.raises(ValueError, match="not a torch device"):
        check_device("gpu")
    assert parse_devices("0,2") == ["cuda:0", "cuda:2"] and parse_devices("cpu,cpu") == ["cpu", "cpu"]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_devices("0,,1")


def test_search_with_a_missing_device_writes_nothing(tmp_path, capsys):
    from evoprune._cli import main

    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("needs a machine without cuda:7")
    (tmp_path / "c.yaml").write_text("model: reference:tiny\ncalibration: {num_sequences: 2, seq_len: 32}\n"
                                     "stop: {n_trials: 1}\n")
    db = tmp_path / "s.db"
    assert main(["search", str(tmp_path / "c.yaml"), "--storage", f"sqlite:///{db}", "--device", "cuda:7"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("evoprune: error: device 'cuda:7' is not available") and "\n" not in err
    assert not db.exists()
    with pytest.raises(SystemExit):  # argparse: float64 is not a study dtype
        main(["search", str(tmp_path / "c.yaml"), "--storage", f"sqlite:///{db}", "--dtype", "float64"])
    assert not db.exists()
