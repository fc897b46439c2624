"""Export formats of a materialized candidate (``hf``, ``gguf``, ``nemotron-nas``) and llama.cpp's runner.

:func:`export_format` writes every format from ``pruner.materialize(candidate)``: it is the export
of every strategy with a fixed smaller model (``Pruner.export`` -> ``strategy.export``).
:func:`save_hf` is the one HF writer, :data:`EXPORT_FORMAT_VERSION` the version written into every
export's ``evoprune`` section. :class:`LlamaCppRunner` runs a GGUF file in llama.cpp (for
:mod:`._verify` and the benches). The round-trip check itself is :mod:`._verify`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._paths import atomic_folder, new_folder
from ._gguf import GGUF_DTYPES, ExportFormatError, check_gguf_support, check_tokenizer, write_gguf
from ._modules import quiet_heterogeneous_warnings
from ._nemotron import check_candidate_fits, check_nemotron_nas_support, write_nemotron_nas
from ._placeholders import add_placeholders

__all__ = ["EXPORT_FORMATS", "EXPORT_FORMAT_VERSION", "LlamaCppRunner", "check_format", "check_format_args",
           "export_format", "gguf_file_name", "save_hf"]

EXPORT_FORMATS = ("hf", "gguf", "nemotron-nas")

EXPORT_FORMAT_VERSION = 2
"""1: dense ``model_type`` + ``per_layer_config``; 2: ``evoprune_<dense>`` ``model_type`` unless stock
transformers builds the export exactly; ``dense_model_type`` recorded."""


def gguf_file_name(dtype: str) -> str:
    """The GGUF file's name inside a ``--format gguf`` export folder."""
    return f"model-{dtype}.gguf"


def check_format_args(fmt: str, dtype: str | None) -> None:
    """The format name and ``dtype`` (before a model is loaded)."""
    if fmt not in EXPORT_FORMATS:
        raise ExportFormatError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}.")
    if dtype is not None and fmt != "gguf":
        raise ExportFormatError(f"--dtype applies to --format gguf only (the {fmt} export keeps the model's dtype).")
    if dtype is not None and dtype not in GGUF_DTYPES:
        raise ExportFormatError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}.")


def check_format(pruner: Any, candidate: Any, fmt: str, *, tokenizer: Any = None, dtype: str | None = None) -> None:
    """Every check of ``fmt`` that can run before anything is written (cheap: configs and counts only)."""
    check_format_args(fmt, dtype)
    config = pruner.model.config
    if fmt == "gguf":
        check_gguf_support(config, dtype or "f32")
        check_tokenizer(tokenizer)
        if pruner.adapter.qk_norm:
            raise ExportFormatError("GGUF export cannot hold per-head q/k norms (as in Qwen3); export this model as a "
                                    "Hugging Face checkpoint (--format hf).")
    elif fmt == "nemotron-nas":
        check_nemotron_nas_support(config)
        kept = [candidate.layers[i] for i in candidate.kept_layers]
        check_candidate_fits(pruner.spec.num_heads, [lc.num_kv_heads for lc in kept])


def save_hf(model: nn.Module, folder: Path, tokenizer: Any = None, **save_kwargs: Any) -> None:
    """A materialized model (and the tokenizer) as HF checkpoint files in ``folder``."""
    with quiet_heterogeneous_warnings():
        model.save_pretrained(folder, **save_kwargs)
    add_placeholders(folder)  # dropped sublayers: a stock class fails loudly instead of loading it wrong
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def export_format(pruner: Any, candidate: Any, path: str | os.PathLike[str], *, fmt: str = "hf", tokenizer: Any = None,
                  dtype: str | None = None, **save_kwargs: Any) -> Path:
    """Write ``pruner.materialize(candidate)`` in ``fmt`` into the new folder ``path`` (after all checks;
    nothing is written when one fails) and return its path.

    * ``hf``: a standard HF checkpoint folder (see ``Pruner.export``);
    * ``gguf``: the HF export folder (evoprune's own model, used by ``verify-export``) plus
      ``model-<dtype>.gguf`` in it;
    * ``nemotron-nas``: a DeciLM / Nemotron-NAS folder (``block_configs``) for vLLM.
    """
    path = new_folder(path)
    check_format(pruner, candidate, fmt, tokenizer=tokenizer, dtype=dtype)
    if fmt == "hf":
        model = pruner.materialize(candidate)
        try:
            with atomic_folder(path) as partial:
                save_hf(model, partial, tokenizer, **save_kwargs)
        finally:
            del model
        return path
    if fmt == "gguf":
        dtype = dtype or "f32"
        model = pruner.materialize(candidate).eval()  # once: the HF files and the GGUF come from it
        section = model.config.evoprune
        with atomic_folder(path) as partial:
            save_hf(model, partial, tokenizer, **save_kwargs)
            write_gguf(model, partial / gguf_file_name(dtype), tokenizer=tokenizer, dtype=dtype,
                       name=f"{section.get('dense_name_or_path') or 'model'} (evoprune {candidate.key[:12]})",
                       metadata={"candidate_key": candidate.key,
                                 "model_fingerprint": str(section.get("model_fingerprint"))})
        return path
    if fmt == "nemotron-nas":
        model = pruner.materialize(candidate).eval()
        section = dict(model.config.evoprune)
        return write_nemotron_nas(model, path, tokenizer=tokenizer, evoprune_section=section,
                                  dense_heads=pruner.spec.num_heads)
    raise AssertionError(fmt)


class LlamaCppRunner:
    """A GGUF file in llama.cpp (``llama-cpp-python``): greedy tokens and all-position logits."""

    def __init__(self, path: str | os.PathLike[str], *, n_ctx: int = 512, n_threads: int = 1,
                 f32_cache: bool = True) -> None:
        """``f32_cache``: keep llama.cpp's KV cache in f32 (its default, f16, rounds keys and values: about
        1e-2 logit differences on a 30-block model, none from the export)."""
        try:
            import llama_cpp
        except ImportError as exc:
            raise ImportError("checking a GGUF file needs llama-cpp-python: pip install llama-cpp-python "
                              "(it builds llama.cpp from source, about 15 minutes on 2 cores)") from exc
        cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=n_threads,
                                   n_threads_batch=n_threads, **cache)

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        return torch.tensor(self.llm.scores[: len(ids)], dtype=torch.float32)

    def greedy(self, ids: list[int], steps: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(steps):
            tok = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            out.append(tok)
            self.llm.eval([tok])
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def close(self) -> None:
        self.llm.close()
