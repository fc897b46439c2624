"""LMEval on the in-memory candidate, offline, with local task files."""

from __future__ import annotations

import json
import socket

import pytest

from evoprune.evaluators import EvalContext, LMEval
from evoprune.pruning import Pruner
from helpers import calib, candidate
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared 2 cores: one intra-op thread


@pytest.fixture
def offline(monkeypatch):
    """HF offline switches on, and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    attempts = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network access attempted in an offline test: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield attempts
    assert not attempts, attempts


def _char_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        if len(vocab) < vocab_size:
            vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _write_tasks(d):
    mc = [{"context": f"count {i}:", "choices": [f" {i + 1}", f" {i + 5}", " x"], "label": i % 3} for i in range(6)]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (d / "mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: choices\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    texts = [{"text": "the quick brown fox jumps over the lazy dog " * (i + 1)} for i in range(3)]
    (d / "ppl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))
    (d / "ppl.yaml").write_text(
        "task: tiny_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'ppl.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )


def test_lmeval_local_tasks_offline(tmp_path, offline):
    _write_tasks(tmp_path)
    model = tiny_model("llama")
    ctx = EvalContext(tokenizer=_char_tokenizer(model.config.vocab_size))
    ev = LMEval(["tiny_mc", "tiny_ppl"], metric="acc", include_path=tmp_path, include_defaults=False, batch_size=4)
    assert ev.direction == "maximize" and ev.name == "lm_eval:tiny_mc:acc"
    res = ev.evaluate(model, None, ctx)
    assert 0.0 <= res.value <= 1.0
    assert res.details["tiny_mc"]["acc,none"] == res.value
    assert res.details["tiny_ppl"]["word_perplexity,none"] > 1.0
    assert res.details["tiny_ppl"]["bits_per_byte,none"] > 0.0
    # pick another metric of another task; perplexities are minimized
    ppl = LMEval(["tiny_ppl"], metric="bits_per_byte", include_path=tmp_path, include_defaults=False)
    assert ppl.direction == "minimize"
    assert ppl.evaluate(model, None, ctx).value == pytest.approx(res.details["tiny_ppl"]["bits_per_byte,none"],
                                                                 rel=1e-4)
    # the task manager is built once per context
    assert len(ctx.shared["lm_eval_task_managers"]) == 1
    with pytest.raises(KeyError, match="metric"):
        LMEval(["tiny_mc"], metric="f1", include_path=tmp_path, include_defaults=False).evaluate(model, None, ctx)
    with pytest.raises(ValueError, match="tokenizer"):
        ev.evaluate(model, None, EvalContext())


def test_lmeval_reference_tasks_on_applied_candidate(ref_data, offline):
    tasks = ref_data.path / "lm_eval_tasks"
    model = ref_data.model()
    pruner = Pruner(model, calib(ref_data.eval_ids))
    spec = pruner.spec
    ctx = EvalContext(tokenizer=ref_data.tokenizer, pruner=pruner)
    ev = LMEval(["evoprune_ref_cloze", "evoprune_ref_ppl"], metric="acc", include_path=tasks,
                include_defaults=False, limit=40, batch_size=16)
    dense = ev.evaluate(model, None, ctx)
    cut = candidate(spec, mlp=spec.intermediate_size // 4, drop=(1, 2))
    with pruner.applied(cut):
        pruned = ev.evaluate(model, cut, ctx)
    assert dense.details["evoprune_ref_cloze"]["acc,none"] == dense.value
    # the pruned model is a worse language model
    ppl = lambda r: r.details["evoprune_ref_ppl"]["word_perplexity,none"]  # noqa: E731
    assert ppl(pruned) > ppl(dense)


def test_padded_loglikelihood_batches_pass_their_mask_to_a_probe_model(tmp_path, offline):
    """lm-eval right-pads multiple-choice batches and calls the model without a mask; evoprune passes the real
    lengths (as an attention mask), so the probe mode can leave the padding out."""
    import torch

    from evoprune.space import Candidate, LayerConfig, ProbeSettings

    _write_tasks(tmp_path)
    model = tiny_model("llama")
    pruner = Pruner(model, calib(torch.arange(4000) % 97))
    pruner.set_mode("probe", ProbeSettings(batch_ratio=0.5, momentum=1.0))
    s = pruner.spec
    cand = Candidate(layers=(LayerConfig(num_kv_heads=s.num_kv_heads, q_per_kv=max(1, s.q_per_kv - 1),
                                         mlp_channels=s.intermediate_size // 2),) * s.num_layers)
    masks = []
    h = pruner.model.model.register_forward_pre_hook(
        lambda m, a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
    ctx = EvalContext(tokenizer=_char_tokenizer(model.config.vocab_size), pruner=pruner)
    ev = LMEval(["tiny_mc"], metric="acc", include_path=tmp_path, include_defaults=False, batch_size=1)
    with pruner.applied(cand):
        ev.evaluate(model, cand, ctx)  # batch 1: nothing padded, no mask
        assert all(m is None for m in masks)
        many = LMEval(["tiny_mc"], metric="acc", include_path=tmp_path, include_defaults=False,
                      batch_size=8).evaluate(model, cand, ctx)
    h.remove()
    assert any(m is not None and not bool(m.all()) for m in masks)  # padded batches carried their mask
    assert 0.0 <= many.value <= 1.0
