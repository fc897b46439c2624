"""Tiny random-weight transformers models for tests (import as ``from tiny_models import ...``).

Every listed architecture keeps its distinguishing features at toy size:
Llama and Mistral (GQA), Qwen2 (GQA + q/k/v bias), Qwen3 (GQA + q/k norms,
explicit head_dim), Phi-3 (fused qkv_proj and gate_up_proj, GQA).
"""

from __future__ import annotations

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3")

_COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(arch: str, **overrides):
    """A toy config of ``arch`` ('llama', 'mistral', 'qwen2', 'qwen3', 'phi3')."""
    import transformers

    kw = dict(_COMMON)
    if arch == "llama":
        cls = transformers.LlamaConfig
    elif arch == "mistral":
        cls = transformers.MistralConfig
        kw["sliding_window"] = None
    elif arch == "qwen2":
        cls = transformers.Qwen2Config
        kw["use_sliding_window"] = False
    elif arch == "qwen3":
        cls = transformers.Qwen3Config
        kw["head_dim"] = 16  # != hidden / heads on purpose
        kw["use_sliding_window"] = False
    elif arch == "phi3":
        cls = transformers.Phi3Config
    else:
        raise ValueError(f"unknown arch {arch!r}; use one of {ARCHS}")
    kw.update(overrides)
    return cls(**kw)


def tiny_model(arch: str, *, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random-weight causal LM of ``arch`` in eval mode."""
    import transformers

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init leaves norms at 1 and biases at 0; perturb them so tests see them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()
