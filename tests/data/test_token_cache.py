"""Reference-corpus splits are tokenized once per tokenizer and read back from the corpus cache."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from evoprune.data._sources import token_stream, tokenized_split


def test_split_tokens_are_cached_exactly_and_a_damaged_cache_is_rebuilt(reference_corpus, reference_tiny, monkeypatch):
    tok = AutoTokenizer.from_pretrained(reference_tiny)
    first, fp = tokenized_split(tok, "validation", reference_corpus)
    files = sorted((reference_corpus.root / "tokens").glob("validation-*.npy"))
    assert files, "the stream was cached"
    again, fp2 = tokenized_split(tok, "validation", reference_corpus)
    assert fp2 == fp and torch.equal(again, first)
    # the cached stream is exactly what encoding all texts in one call gives
    texts = reference_corpus.texts("validation")
    monkeypatch.setattr("evoprune.data._sources._ENCODE_BATCH", 1)  # one document per tokenizer call
    assert len(texts) > 1
    one_call = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    flat = [i for ids in one_call for i in (*ids, tok.eos_token_id)]
    assert first.tolist() == flat
    assert torch.equal(token_stream(tok, texts), first)
    for f in files:
        f.write_bytes(b"not an array")
    rebuilt, fp3 = tokenized_split(tok, "validation", reference_corpus)
    assert fp3 == fp and torch.equal(rebuilt, first)
