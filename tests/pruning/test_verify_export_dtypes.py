"""Issue 23 point 8: `verify-export` compares a half-precision GGUF with evoprune's model at the file's
dtype (its matrices rounded as the writer rounded them), so a correct f16/bf16 export passes, and a
file with a corrupted tensor still fails, at each dtype."""

from __future__ import annotations

import pytest
from helpers import sibling_module

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (the dev extra has it)")
_gguf = sibling_module(__file__, "test_export_gguf")
_pruner, random_candidate, tok = _gguf._pruner, _gguf.random_candidate, _gguf.tok  # tok: a fixture


def _corrupt_one_matrix(path) -> str:
    """Zero the first nonzero block matrix of a GGUF file in place; returns its name."""
    reader = gguf.GGUFReader(str(path), "r+")
    t = next(t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2 and t.data.any())
    t.data[...] = 0
    reader.data.flush()
    return t.name


@pytest.mark.parametrize("dtype", ("f32", "f16", "bf16"))
def test_verify_export_passes_a_correct_file_and_fails_a_corrupted_one(dtype, tok, tmp_path, capsys):  # noqa: F811
    from evoprune._cli import main
    from evoprune.pruning import verify_export

    pruner, spec = _pruner("llama")
    folder = pruner.export(random_candidate(spec, 3), tmp_path / dtype, tokenizer=tok, format="gguf", dtype=dtype)
    (ok,) = verify_export(folder, prompt_ids=[1, 5, 17, 33, 40, 61, 8, 90], steps=8)
    assert ok.dtype == dtype and ok.tokens_match
    assert ok.max_logit_diff <= ok.tolerance, (ok.max_logit_diff, ok.tolerance)
    if dtype != "f32":
        assert f"rounded to {dtype}" in ok.reference
    assert main(["verify-export", str(folder), "--tokens", "8"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "reference: evoprune's model" in out and "verify-export: OK" in out, out
    print(dtype, "correct", ok.max_logit_diff)

    name = _corrupt_one_matrix(folder / f"model-{dtype}.gguf")
    (bad,) = verify_export(folder, prompt_ids=[1, 5, 17, 33, 40, 61, 8, 90], steps=8)
    print(dtype, "corrupted", name, bad.max_logit_diff, bad.tokens_match)
    assert bad.max_logit_diff > bad.tolerance, (name, bad.max_logit_diff, bad.tolerance)
    assert bad.max_logit_diff > 20 * max(ok.max_logit_diff, 1e-5), (name, bad.max_logit_diff)
    assert main(["verify-export", str(folder), "--tokens", "8"]) == 1
    assert "verify-export: FAILED" in capsys.readouterr().out
