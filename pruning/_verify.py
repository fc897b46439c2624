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
    ref_tokens, ref_logits = _greedy_torch(model, ids, steps)
    results = []
    for g in ggufs:
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
                                    tokenizer_match=tok_match))
    return results


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
                  float64: bool = False, tolerance: float = 1e-3) -> tuple[list[str], bool]:
    """``evoprune verify-export``: the printable lines and whether every target matched within ``tolerance``."""
    if steps < 1 or threads < 1:
        raise ValueError(f"--tokens and --threads must be >= 1, got {steps} and {threads}.")
    results = verify_export(path, prompt=prompt, steps=steps, n_threads=threads,
                            reference_dtype=torch.float64 if float64 else torch.float32)
    from transformers import AutoTokenizer

    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    lines = describe(results, AutoTokenizer.from_pretrained(folder))
    ok = all(r.tokens_match and r.max_logit_diff <= tolerance for r in results)
    lines.append(f"verify-export: {'OK' if ok else 'FAILED'} (tolerance {tolerance:g})")
    return lines, ok
