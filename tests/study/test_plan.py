"""`evoprune plan` / `evoprune.plan`: memory, FLOPs and time of a study from the model's config.json
alone (issue 28). The Llama-3.1-8B figures are computed here independently of the cost model."""

from __future__ import annotations

import json

import pytest

import evoprune
from evoprune.search import StudyConfig

# Llama-3.1-8B's config.json (meta-llama/Llama-3.1-8B), written by hand: no weights anywhere
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "vocab_size": 128256,
}


def _llama_folder(tmp_path):
    folder = tmp_path / "llama-3.1-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_31_8B))
    return folder


def _config(model, **over):
    return StudyConfig.from_dict({"model": str(model), "dtype": "bfloat16", "device": "cuda",
                                  "calibration": {"num_sequences": 128, "seq_len": 2048},
                                  "space": {"attention": "kv_groups", "mlp_step": 512},
                                  "budget": {"metric": "params", "max_ratio": 0.6},
                                  "preset": "default", "eval_batch_size": 8, **over})


def test_llama_31_8b_plan_from_config_json_alone(tmp_path):
    cfg = _config(_llama_folder(tmp_path))
    p = evoprune.plan(cfg, gpu_memory=80, gpu_tflops=989, gpu_bandwidth=3350)
    L, H, I, V, nq, nkv, hd = 32, 4096, 14336, 128256, 32, 8, 128
    linear = L * (H * nq * hd + 2 * H * nkv * hd + nq * hd * H + 3 * H * I)
    params = 2 * V * H + H + L * 2 * H + linear  # untied embeddings and lm_head, final norm, 2 norms a block
    assert params == 8_030_261_248  # the published count
    assert p.params == params
    rows = {m["component"]: m for m in p.memory}
    assert rows["weights"]["device"] == 2 * params and rows["weights"]["host"] == 2 * params  # bf16, via the host
    assert p.kv_bytes_per_token == L * 2 * nkv * hd * 2 == 131_072
    for st in p.stages:
        t = st["seq_len"]
        assert st["flops_per_token"] == 2 * (linear + V * H) + L * 4 * nq * hd * (t + 1) // 2
    # the 128k vocabulary takes top-256 references: tokens * (256 * (4 + 4) + 4) bytes
    assert all(st["top_k"] == 256 for st in p.stages)
    per_token = 256 * 8 + 4
    assert p.dense_reference_disk_bytes == sum(st["tokens"] for st in p.stages) * per_token
    # in memory: all of them (below the 2 GiB bound) and the largest again while it is computed
    assert rows["dense reference"]["host"] == p.dense_reference_disk_bytes + max(st["tokens"] for st in p.stages) * per_token
    # activations: fp32 logits twice and bf16 logits of one forward dominate; one sequence of 256 per forward
    big = max(p.stages, key=lambda s: s["seq_len"])
    assert big["batch"] == max(1, min(8, 64 * 2**20 // (big["seq_len"] * V * 4)))
    assert rows["activations"]["device"] >= big["batch"] * big["seq_len"] * V * 10
    assert rows["level database"]["host"] == rows["level database"]["device"] == 0
    assert p.peak_device_bytes > 2 * params and p.fits is True
    assert evoprune.plan(cfg, gpu_memory=16, gpu_tflops=989, gpu_bandwidth=3350).fits is False
    # times from the figures: compute-bound forwards, so a candidate's s1 seconds ~ its FLOPs / (MFU x peak)
    s1 = p.stages[0]
    flops = s1["flops_per_token"] * s1["candidate_flops_ratio"] * s1["new_tokens"]
    assert flops / (989e12 * 0.5) < s1["seconds_per_candidate"] < 3 * flops / (989e12 * 0.5)
    assert p.generations >= 3 and p.search_tokens > p.generation_tokens
    assert p.workers[0]["workers"] == 1 and p.workers[1]["workers"] == 2
    # candidates split among workers; the sampler's own seconds per generation do not
    assert p.workers[1]["generation_seconds"] < p.workers[0]["generation_seconds"]
    assert p.workers[1]["generation_seconds"] > p.workers[0]["generation_seconds"] / 2
    text = "\n".join(p.lines())
    assert "8,030,261,248 parameters" in text and "level database" in text


def test_plan_with_finetune_counts_fp32_optimizer_state(tmp_path):
    stages = [{"name": "s1", "eval_tokens": 2048, "seq_len": 256, "finetune_tokens": 4096,
               "finetune": {"batch_size": 2}}]
    p = evoprune.plan(_config(_llama_folder(tmp_path), stages=stages), gpu_tflops=989, gpu_bandwidth=3350)
    ft = {m["component"]: m for m in p.memory}["fine-tune"]
    params = p.params
    # backup (bf16) + fp32 master and its gradient + bf16 gradient + AdamW's two fp32 moments
    assert ft["device"] >= params * (2 + 8 + 2 + 8)
    assert "fp32 masters" in ft["note"]


def test_plan_cli_and_bad_input(tmp_path, capsys):
    from evoprune._cli import main

    folder = _llama_folder(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_config(folder).to_yaml())
    assert main(["plan", str(cfg), "--gpu-memory", "80", "--gpu-tflops", "989", "--gpu-bandwidth", "3350"]) == 0
    out = capsys.readouterr().out
    assert "fits in 80.000 GiB" in out and "workers on one database" in out
    assert main(["plan", str(cfg), "--gpu-memory", "10", "--gpu-tflops", "989", "--gpu-bandwidth", "3350"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", str(cfg), "--gpu-tflops", "989"]) == 1
    assert "together" in capsys.readouterr().err
    (folder / "config.json").write_text("{not json")
    assert main(["plan", str(cfg), "--gpu-tflops", "989", "--gpu-bandwidth", "3350"]) == 1
    err = capsys.readouterr().err.strip()
    assert "config.json is not valid JSON" in err and "\n" not in err
    (tmp_path / "m.yaml").write_text(_config(tmp_path / "nowhere").to_yaml())
    assert main(["plan", str(tmp_path / "m.yaml"), "--no-measure"]) == 2
    assert "does not exist" in capsys.readouterr().err
    good = tmp_path / "g.yaml"
    folder2 = tmp_path / "llama2"
    folder2.mkdir()
    (folder2 / "config.json").write_text(json.dumps(LLAMA_31_8B))
    good.write_text(_config(folder2).to_yaml())
    if not __import__("torch").cuda.is_available():
        assert main(["plan", str(good), "--device", "cuda:7"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("evoprune: error: device 'cuda:7' is not available") and "\n" not in err


def test_plan_measures_on_this_cpu(reference_tiny, tmp_path):
    cfg = StudyConfig.from_dict({"model": "reference:tiny", "calibration": {"num_sequences": 4, "seq_len": 64},
                                 "space": {"attention": "kv_groups", "mlp_step": 16},
                                 "budget": {"metric": "params", "max_ratio": 0.7}, "preset": "default",
                                 "stop": {"n_generations": 4}})
    p = evoprune.plan(cfg)
    assert p.device == "cpu" and p.time_source.startswith("a calibration run")
    rows = {m["component"]: m for m in p.memory}
    assert rows["runtime"]["host"] > 100 * 2**20  # torch alone is larger than that
    assert all(m["device"] == 0 for m in p.memory) and p.peak_device_bytes == 0
    assert all(st["seconds_per_candidate"] > 0 and st["reference_seconds"] > 0 for st in p.stages)
    assert p.trial_overhead_seconds > 0 and p.setup_seconds > 0
    assert [st["candidates"] for st in p.stages] == [16, 2, 1]  # offspring; half of racing's max_count 4, then 2
    assert [st["new_tokens"] for st in p.stages] == [2048, 8192 - 2048, 16384 - 8192]  # extends: new windows only
    assert p.seconds_for(4) == pytest.approx(sum(st["reference_seconds"] for st in p.stages)
                                             + p.first_generation_seconds + p.second_generation_seconds
                                             + 2 * p.generation_seconds)
    assert p.sampler_seconds >= 0 and p.second_generation_seconds > p.first_generation_seconds
    bf = evoprune.plan(cfg, dtype="bfloat16", measure=False)
    assert {m["component"]: m for m in bf.memory}["weights"]["host"] * 2 == rows["weights"]["host"]


def test_plan_counts_the_level_database_of_a_sparse_space(tmp_path):
    """A sparse space takes SparseGPT levels by default: the plan names the database and its size (the
    shapes' count, checked against the real database in tests/pruning/test_levels.py)."""
    from evoprune.pruning import levels_from_space
    from evoprune.search import space_from_config

    folder = _llama_folder(tmp_path)
    budget = {"metric": "nonzero_params", "max_ratio": 0.6}
    cfg = _config(folder, space={"attention": None, "mlp": False, "sparsity_levels": [0, 0.5, 0.6, 0.7]}, budget=budget)
    p = evoprune.plan(cfg, gpu_memory=80, gpu_tflops=989, gpu_bandwidth=3350)
    row = {m["component"]: m for m in p.memory}["level database"]
    L, H, I, nq, nkv, hd = 32, 4096, 14336, 32, 8, 128
    linear = L * (2 * H * nq * hd + 2 * H * nkv * hd + 3 * H * I)
    assert p.level_database_bytes == 3 * linear * 4  # three sparsity levels of every linear, float32
    space = space_from_config(cfg, json.loads((folder / "config.json").read_text()))
    assert p.level_database_bytes == levels_from_space(space).nbytes(space.spec)
    assert row["host"] == linear * 4 and row["device"] == linear * 2 and "sparsegpt sparsity" in row["note"]
    assert "level database: 78.0" in "\n".join(p.lines())  # GiB: 3 x 7.0e9 weights x 4 bytes
    dense = evoprune.plan(_config(folder, space={"attention": None, "mlp": False, "sparsity_levels": [0, 0.5],
                                                 "sparsity_method": None}, budget=budget),
                          gpu_tflops=989, gpu_bandwidth=3350)
    assert dense.level_database_bytes == 0
