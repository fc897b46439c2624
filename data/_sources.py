"""Text sources -> 1-D token streams: the reference corpus, local text files, hub datasets.

One rule turns texts into a token stream (:func:`token_stream`): each text is
tokenized without special tokens and followed by the tokenizer's EOS token
(when it has one), so windows cut from the stream never silently glue two
documents together. Everything else here only chooses the texts:

* :func:`tokenized_split` -- one split of the reference corpus, plus its fingerprint;
* :func:`load_splits` -- the ``train`` / ``validation`` / ``calibration`` streams of a
  study's ``data`` settings (``source`` ``"reference"``, ``"text"`` or ``"hub"``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fingerprint import ids_fingerprint
from ._corpus import ReferenceCorpus, load_reference_corpus

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["load_splits", "token_stream", "tokenized_split"]

#: The streams a study needs; ``load_splits`` returns them in this order.
STUDY_SPLITS: tuple[str, ...] = ("train", "validation", "calibration")


def token_stream(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """Concatenate ``texts`` into one 1-D ``torch.long`` stream, each followed by EOS.

    Texts are encoded by calling ``tokenizer`` (so a Hugging Face tokenizer's
    own truncation / padding settings are switched off, as in any
    ``tokenizer(texts)`` call) with ``add_special_tokens=False``, and without
    the "longer than model_max_length" warning, which does not apply to a
    stream that is cut into windows later.
    """
    import torch
    import transformers

    kwargs: dict[str, Any] = {"add_special_tokens": False}
    if isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        kwargs["verbose"] = False
    encoded = tokenizer(list(texts), **kwargs)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        if eos is not None:
            stream.append(int(eos))
    return torch.tensor(stream, dtype=torch.long)


def tokenized_split(
    tokenizer: Any,
    split: str,
    corpus: ReferenceCorpus | None = None,
) -> tuple[torch.Tensor, str]:
    """One split of the reference corpus as a :func:`token_stream`, plus its fingerprint.

    Documents are taken in the split's (sorted) order. The fingerprint is the
    whole sha256 (64 hex chars) of :func:`evoprune._fingerprint.ids_fingerprint`,
    so it identifies corpus, split *and* tokenizer at once (its first 16
    characters are the short ``ids_fingerprint``). ``corpus`` defaults to
    :func:`load_reference_corpus()`.
    """
    corpus = corpus if corpus is not None else load_reference_corpus()
    stream = token_stream(tokenizer, corpus.texts(split))
    return stream, ids_fingerprint(stream, chars=64)


def load_splits(
    data: Any, tokenizer: Any, *, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, torch.Tensor]:
    """``{"train", "validation", "calibration"}`` -> 1-D token streams of a study's ``data`` settings.

    ``data`` has the fields of ``evoprune.search.StudyConfig.data``: ``source``
    (``"reference"``, ``"text"`` or ``"hub"``), ``train`` / ``validation`` /
    ``calibration`` (text files), ``path`` / ``name`` / ``text_field`` /
    ``train_split`` / ``validation_split`` / ``calibration_split`` (hub) and
    ``max_documents``. Calibration defaults to the train texts. ``cache_dir``
    is where the reference corpus is cached (default: the cache root).
    """
    if data.source == "reference":
        corpus = load_reference_corpus(cache_dir)
        return {s: tokenized_split(tokenizer, s, corpus)[0] for s in STUDY_SPLITS}
    if data.source == "text":
        def read(paths: Sequence[str]) -> list[str]:
            out = []
            for p in paths:
                path = Path(p).expanduser()
                if not path.is_file():
                    raise FileNotFoundError(f"StudyConfig.data: text file {path} does not exist.")
                out.append(path.read_text(encoding="utf-8"))
            return out[: data.max_documents] if data.max_documents else out

        train = read(data.train)
        return {
            "train": token_stream(tokenizer, train),
            "validation": token_stream(tokenizer, read(data.validation)),
            "calibration": token_stream(tokenizer, read(data.calibration) if data.calibration else train),
        }
    # hub
    try:
        import datasets
    except ImportError:
        raise ImportError(
            'StudyConfig.data source "hub" needs the `datasets` package: pip install datasets '
            '(or use source "text" with local files).'
        ) from None

    def split(name: str) -> list[str]:
        ds = datasets.load_dataset(data.path, data.name, split=name)
        if data.text_field not in ds.column_names:
            raise ValueError(
                f"StudyConfig.data: dataset {data.path!r} split {name!r} has no column {data.text_field!r} "
                f"(columns: {ds.column_names}); set data.text_field."
            )
        texts = [t for t in ds[data.text_field] if t and t.strip()]
        return texts[: data.max_documents] if data.max_documents else texts

    train = split(data.train_split)
    return {
        "train": token_stream(tokenizer, train),
        "validation": token_stream(tokenizer, split(data.validation_split)),
        "calibration": token_stream(tokenizer, split(data.calibration_split)) if data.calibration_split else
        token_stream(tokenizer, train),
    }
