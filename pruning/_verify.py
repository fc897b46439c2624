"""``evoprune verify-export``: the same prompt through evoprune's own model and through the target engine.

:func:`verify_export` runs llama.cpp (``llama-cpp-python``, :class:`~._serve.LlamaCppRunner`) on a GGUF
export and vLLM's ``block_configs`` reading rules on a Nemotron-NAS export, next to evoprune's model
(:func:`~evoprune.pruning.load_pruned`): greedy tokens and the max logit difference.
:func:`verify_report` is the CLI verb's printable lines and verdict.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from .._logging import get_logger
from ._load import load_pruned
from ._nemotron import deci_reference_model, evoprune_model_from_nemotron_nas
from ._serve import LlamaCppRunner

__all__ = ["DEFAULT_PROMPT", "VerifyResult", "describe", "verify_export", "verify_report"]

_log = get_logger("pruning")

DEFAULT_PROMPT = "The capital of France is"


@dataclasses.dataclass
class VerifyResult:
    """What ``verify-export`` found."""

    target: str  # "llama.cpp (GGUF ...)" / "vLLM rules (Nemotron-NAS)"
    file: str
    prompt_ids: list[int]
    reference_tokens: list[int]
    target_tokens: list[int]
    max_logit_diff: float
    tokenizer_match: bool | None = None  # llama.cpp's own tokenization of the prompt == transformers'
    dtype: str = "f32"  # the target file's matrix type (GGUF)
    reference: str = "evoprune's model"  # what the target was compared with
    tolerance: float = 1e-3  # the default max logit difference for it (:func:`default_tolerance`)

    @property
    def tokens_match(self) -> bool:
        return self.reference_tokens == self.target_tokens


def _greedy_torch(model: Any, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation (no cache: one full forward per step) and the logits of ids + continuation."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
        full = model(torch.tensor([seq])).logits[0]
    return seq[len(ids):], full


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=True).input_ids)


def verify_export(path: str | os.PathLike[str], *, prompt: str = DEFAULT_PROMPT, steps: int = 20,
                  prompt_ids: list[int] | None = None, n_threads: int = 1,
                  reference_dtype: torch.dtype = torch.float32) -> list[VerifyResult]:
    """Run ``prompt`` through evoprune's own model and through the target engine of the export at ``path``.

    ``path`` is a ``--format gguf`` export folder (or a ``.gguf`` file inside one: evoprune's model is
    :func:`load_pruned` of that folder, the target is llama.cpp) or a ``--format nemotron-nas``
    folder (evoprune's model is rebuilt with the real widths its ``evoprune`` section records; the
    target is the folder read by vLLM's rules, see :func:`~._nemotron.deci_reference_model`).
    One result per GGUF file (or one for Nemotron-NAS). ``prompt_ids`` (token ids) overrides ``prompt``.
    ``reference_dtype=torch.float64`` runs evoprune's model in double precision: on a deep pruned model
    float32 PyTorch itself is ~1e-3 off in the logits (llama.cpp's f32 ones are closer to float64).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give an export folder or a .gguf file in one.")
    folder = path.parent if path.is_file() else path
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; verify-export needs the folder written by "
                                "`evoprune export --format gguf|nemotron-nas`.")
    cfg = json.loads(config_file.read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder) if prompt_ids is None else None
    ids = list(prompt_ids) if prompt_ids is not None else _prompt_ids(tokenizer, prompt)
    if cfg.get("model_type") == "nemotron-nas":
        return [_verify_nemotron(folder, ids, steps, reference_dtype)]
    ggufs = [path] if path.is_file() else sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"{folder} has no .gguf file and is not a Nemotron-NAS export; export with "
                                "--format gguf or --format nemotron-nas first.")
    model = load_pruned(folder, dtype=reference_dtype).eval()
    dense_ref = _greedy_torch(model, ids, steps)
    results = []
    for g in ggufs:
        # the reference at the file's dtype: its matrices rounded as the writer rounded them (norms stay f32)
        file_dtype = gguf_dtype(g)
        ref_tokens, ref_logits = dense_ref if file_dtype == "f32" else _greedy_torch(
            _rounded(load_pruned(folder, dtype=reference_dtype).eval(), file_dtype), ids, steps)
        reference = f"evoprune's model in {str(reference_dtype).removeprefix('torch.')}" + (
            "" if file_dtype == "f32" else f", its matrices rounded to {file_dtype} as in the file")
        runner = LlamaCppRunner(g, n_ctx=max(64, len(ids) + steps + 8), n_threads=n_threads)
        try:
            target_tokens = runner.greedy(ids, steps)
            lc = runner.logits(ids + ref_tokens)
            tok_match = None
            if tokenizer is not None:
                plain = list(tokenizer(prompt, add_special_tokens=False).input_ids)
                tok_match = runner.tokenize(prompt) == plain
        finally:
            runner.close()
        diff = float((lc.double() - ref_logits.double()).abs().max())
        results.append(VerifyResult(target=f"llama.cpp ({g.name})", file=str(g), prompt_ids=ids,
                                    reference_tokens=ref_tokens, target_tokens=target_tokens, max_logit_diff=diff,
                                    tokenizer_match=tok_match, dtype=file_dtype, reference=reference,
                                    tolerance=default_tolerance(file_dtype, float(ref_logits.abs().max()))))
    return results


#: ``verify-export``'s default tolerance (max logit difference) of an f32 file
DEFAULT_TOLERANCE = 1e-3


def default_tolerance(dtype: str, logits_absmax: float) -> float:
    """The default tolerance for a ``dtype`` GGUF file, compared with the reference whose matrices are rounded
    alike: ``4 * eps(dtype) * max |logit|``, at least :data:`DEFAULT_TOLERANCE`; f32: ``1e-4 * max |logit|``,
    at least :data:`DEFAULT_TOLERANCE` (float32 arithmetic itself: on SmolLM2 at 60 % params with 3 blocks
    dropped, max |logit| about 20, float32 PyTorch is about 1e-3 from float64, and llama.cpp's f32 is
    1e-4 from it on an AVX-512 build but 1.3e-3 on an AVX2 AMD EPYC build of the same version). Measured with
    SmolLM2-135M (6 blocks dropped, 20 greedy tokens all equal, max |logit| about 30): f16 1.0e-4 (tolerance
    0.13), bf16 0.24 (tolerance 1.0: llama.cpp's bf16 arithmetic rounds more than the weights alone);
    a tiny Llama (max |logit| 0.52) with one zeroed matrix is 0.09 off, over its f16/bf16 tolerances
    (2.0e-3, 1.6e-2)."""
    if dtype not in ("f16", "bf16"):
        return max(DEFAULT_TOLERANCE, 1e-4 * float(logits_absmax))
    eps = torch.finfo(torch.float16 if dtype == "f16" else torch.bfloat16).eps
    return max(DEFAULT_TOLERANCE, 4.0 * eps * float(logits_absmax))


def gguf_dtype(path: str | os.PathLike[str]) -> str:
    """``"f32"``, ``"f16"`` or ``"bf16"``: the type of a GGUF file's matrices (its token embedding)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    t = types.get("token_embd.weight", next(iter(types.values()), None))
    return {gguf.GGMLQuantizationType.F16: "f16", gguf.GGMLQuantizationType.BF16: "bf16"}.get(t, "f32")


def _rounded(model: Any, dtype: str) -> Any:
    """``model`` with every matrix rounded to ``dtype`` (``"f16"``/``"bf16"``) and back, in place."""
    to = torch.float16 if dtype == "f16" else torch.bfloat16
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(p.to(to).to(p.dtype))
    return model


def _verify_nemotron(folder: Path, ids: list[int], steps: int, dtype: torch.dtype) -> VerifyResult:
    ours = evoprune_model_from_nemotron_nas(folder).to(dtype)
    ref_tokens, ref_logits = _greedy_torch(ours, ids, steps)
    try:
        import vllm  # noqa: F401
        _log.info("vLLM is installed, but verify-export runs its DeciLM reading rules in-process (CPU)")
    except ImportError:
        pass
    target = deci_reference_model(folder).to(dtype)
    target_tokens, target_logits = _greedy_torch(target, ids, steps)
    _, t_full = _greedy_torch(target, ids + ref_tokens, 0)
    diff = float((t_full - ref_logits).abs().max())
    return VerifyResult(target="vLLM DeciLM rules (block_configs)", file=str(folder), prompt_ids=ids,
                        reference_tokens=ref_tokens, target_tokens=target_tokens, max_logit_diff=diff)


def describe(results: list[VerifyResult], tokenizer: Any = None) -> list[str]:
    """Printable lines for the CLI."""
    lines = []
    for r in results:
        lines.append(f"target {r.target}: greedy {len(r.reference_tokens)} tokens "
                     f"{'MATCH' if r.tokens_match else 'DIFFER'}; max logit difference {r.max_logit_diff:.3g}")
        lines.append(f"  reference: {r.reference}")
        if not r.tokens_match:
            first = next(i for i, (a, b) in enumerate(zip(r.reference_tokens, r.target_tokens)) if a != b) \
                if any(a != b for a, b in zip(r.reference_tokens, r.target_tokens)) else len(r.reference_tokens)
            lines.append(f"  first difference at step {first}: evoprune {r.reference_tokens[first:first + 4]} vs "
                         f"target {r.target_tokens[first:first + 4]}")
        if r.tokenizer_match is not None:
            lines.append(f"  llama.cpp tokenizes the prompt {'as transformers does' if r.tokenizer_match else 'DIFFERENTLY from transformers (its pre-tokenizer is not known to evoprune)'}")
        if tokenizer is not None:
            lines.append(f"  evoprune: {tokenizer.decode(r.reference_tokens)!r}")
            lines.append(f"  target:   {tokenizer.decode(r.target_tokens)!r}")
    return lines


def verify_report(path: str | os.PathLike[str], *, prompt: str = DEFAULT_PROMPT, steps: int = 20, threads: int = 1,
                  float64: bool = False, tolerance: float | None = None) -> tuple[list[str], bool]:
    """``evoprune verify-export``: the printable lines and whether every target matched within ``tolerance``
    (default: :func:`default_tolerance` of each file's dtype and logits)."""
    if steps < 1 or threads < 1:
        raise ValueError(f"--tokens and --threads must be >= 1, got {steps} and {threads}.")
    results = verify_export(path, prompt=prompt, steps=steps, n_threads=threads,
                            reference_dtype=torch.float64 if float64 else torch.float32)
    from transformers import AutoTokenizer

    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    lines = describe(results, AutoTokenizer.from_pretrained(folder))
    limits = [r.tolerance if tolerance is None else tolerance for r in results]
    ok = all(r.tokens_match and r.max_logit_diff <= lim for r, lim in zip(results, limits))
    shown = sorted({f"{lim:.3g}" for lim in limits}) or [f"{tolerance or DEFAULT_TOLERANCE:g}"]
    lines.append(f"verify-export: {'OK' if ok else 'FAILED'} (tolerance {', '.join(shown)}"
                 + (f" for {', '.join(sorted({r.dtype for r in results}))}" if tolerance is None else "") + ")")
    return lines, ok
