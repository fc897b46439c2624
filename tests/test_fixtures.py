import torch

from tiny_models import ARCHS, tiny_model


def test_tiny_models_run_and_have_gqa(arch):
    model = tiny_model(arch)
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    ids = torch.randint(3, cfg.vocab_size, (2, 11))
    out = model(ids).logits
    assert out.shape == (2, 11, cfg.vocab_size)
    assert torch.isfinite(out).all()
    names = {n for n, _ in model.named_parameters()}
    if arch == "phi3":
        assert any("qkv_proj" in n for n in names) and any("gate_up_proj" in n for n in names)
    if arch == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in names)
    if arch == "qwen3":
        assert any("q_norm" in n for n in names)
    assert len(ARCHS) == 5
