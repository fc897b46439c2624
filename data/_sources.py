"""Text sources -> 1-D token streams: the reference corpus, local text files, hub datasets.

One rule turns texts into a token stream (:func:`token_stream`): each text is
tokenized without special tokens and followed by the tokenizer's EOS token
(when it has one), so windows cut from the stream never silently glue two
documents together. Everything else here only chooses the texts:

* :func:`tokenized_split` -- one split of the reference corpus, plus its fingerprint;
* :func:`load_splits` -- the ``train`` / ``validation`` / ``calibration`` streams of a
  study's ``data`` settings (``source`` ``"reference"``, ``"text"`` or ``"hub"``);
* :func:`text_files` -- the files a ``"text"`` source reads (each entry a file, a folder -- every
  ``*.txt`` below it -- or a glob pattern such as ``docs/**/*.txt``) and their sha256, which a
  study stores so that a resume reads the same files.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fingerprint import files_sha256, ids_fingerprint
from ._corpus import ReferenceCorpus, load_reference_corpus

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["TextFiles", "load_splits", "resolve_text_files", "text_files", "token_stream", "tokenized_split"]

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
    eos = getattr(tokenizer, "eos_token_id", None)
    parts: list[torch.Tensor] = []
    texts = list(texts)
    for start in range(0, len(texts), _ENCODE_BATCH):  # a few documents at a time: bounded peak memory
        stream: list[int] = []
        for ids in tokenizer(texts[start:start + _ENCODE_BATCH], **kwargs)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(int(eos))
        parts.append(torch.tensor(stream, dtype=torch.long))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


#: Documents encoded per tokenizer call by :func:`token_stream`.
_ENCODE_BATCH = 8


def _tokenizer_digest(tokenizer: Any) -> str | None:
    """sha256 of a fast tokenizer's full definition (vocabulary, merges, normalizer ...) and its EOS
    id, or ``None`` when it cannot be serialized (then nothing is cached)."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        text = backend.to_str() if backend is not None else None
    except Exception:  # noqa: BLE001 - a tokenizer that cannot serialize is simply not cached
        return None
    if text is None:
        return None
    return hashlib.sha256(f"{text}\x00{getattr(tokenizer, 'eos_token_id', None)}".encode()).hexdigest()


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
    stream = _cached_split(tokenizer, split, corpus)
    return stream, ids_fingerprint(stream, chars=64)


def _cached_split(tokenizer: Any, split: str, corpus: ReferenceCorpus) -> torch.Tensor:
    """The split's token stream, from ``<corpus>/tokens`` when this corpus was tokenized with this
    tokenizer before (every process of a study would otherwise spend seconds encoding it again)."""
    import numpy as np
    import torch

    digest = _tokenizer_digest(tokenizer)
    if digest is None:
        return token_stream(tokenizer, corpus.texts(split))
    import hashlib

    key = hashlib.sha256(f"{corpus.fingerprint}:{split}:{digest}".encode()).hexdigest()[:32]
    path = Path(corpus.root) / "tokens" / f"{split}-{key}.npy"
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path).astype(np.int64))
        except (OSError, ValueError):  # a damaged file: tokenize again and rewrite it
            pass
    stream = token_stream(tokenizer, corpus.texts(split))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            small = stream.numel() == 0 or int(stream.max()) < 2**31
            np.save(f, stream.numpy().astype(np.int32 if small else np.int64))
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache: the stream is still right
        pass
    return stream


def load_splits(
    data: Any, tokenizer: Any, *, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, torch.Tensor]:
    """``{"train", "validation", "calibration"}`` -> 1-D token streams of a study's ``data`` settings.

    ``data`` has the fields of ``evoprune.search.StudyConfig.data``: ``source``
    (``"reference"``, ``"text"`` or ``"hub"``), ``train`` / ``validation`` /
    ``calibration`` (text files, folders or glob patterns: :func:`resolve_text_files`), ``path`` / ``name`` / ``text_field`` /
    ``train_split`` / ``validation_split`` / ``calibration_split`` (hub) and
    ``max_documents``. Calibration defaults to the train texts. ``cache_dir``
    is where the reference corpus is cached (default: the cache root).
    """
    if data.source == "reference":
        corpus = load_reference_corpus(cache_dir)
        return {s: tokenized_split(tokenizer, s, corpus)[0] for s in STUDY_SPLITS}
    if data.source == "text":
        files = _text_split_files(data)

        def read(split: str) -> list[str]:
            return [path.read_text(encoding="utf-8") for _, path in files[split]]

        return {s: token_stream(tokenizer, read(s)) for s in STUDY_SPLITS}
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


# --------------------------------------------------------------------------- text files

_GLOB_CHARS = frozenset("*?[")


def _is_pattern(text: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in text)


def resolve_text_files(entries: Sequence[str], *, what: str = "StudyConfig.data") -> list[tuple[str, Path]]:
    """The text files of ``entries``, in order, as ``(name, path)`` pairs (each file once).

    Each entry is a file (name: its file name), a folder (every ``*.txt`` below it, recursively,
    sorted; name: the path below the folder) or a glob pattern with ``*``, ``?``, ``[...]`` and
    ``**`` (the matching files, sorted; name: the path below the pattern's fixed leading folders).
    Relative entries start in the current directory; ``~`` is expanded.

    Raises:
        FileNotFoundError: a plain entry is neither a file nor a folder.
        ValueError: a folder holds no ``*.txt`` file, or a pattern matches no file.
    """
    out: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for entry in entries:
        text = os.path.expanduser(str(entry))
        path = Path(text)
        if _is_pattern(text):
            parts = path.parts
            fixed = next(i for i, part in enumerate(parts) if _is_pattern(part))
            base = Path(*parts[:fixed]) if fixed else Path(".")
            found = sorted((Path(m) for m in glob.glob(text, recursive=True) if os.path.isfile(m)),
                           key=lambda p: p.as_posix())
            if not found:
                raise ValueError(
                    f"{what}: the pattern {entry!r} matches no file (relative patterns start in {Path.cwd()}); "
                    "fix the pattern, e.g. 'docs/**/*.txt'."
                )
            named = [(Path(os.path.relpath(p, base)).as_posix(), p) for p in found]
        elif path.is_dir():
            found = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.as_posix())
            if not found:
                raise ValueError(
                    f"{what}: the folder {entry!r} holds no *.txt file (searched recursively); add text files "
                    f"or give a glob pattern for other names, e.g. '{entry}/**/*.md'."
                )
            named = [(p.relative_to(path).as_posix(), p) for p in found]
        elif path.is_file():
            named = [(path.name, path)]
        else:
            raise FileNotFoundError(
                f"{what}: text file {path} does not exist (an entry is a text file, a folder or a glob pattern)."
            )
        for name, p in named:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append((name, p))
    return out


def _text_split_files(data: Any) -> dict[str, list[tuple[str, Path]]]:
    """``{split: [(name, path)]}`` of a ``"text"`` source: at most ``max_documents`` files per split;
    calibration defaults to the train files."""
    def split(name: str) -> list[tuple[str, Path]]:
        files = resolve_text_files(getattr(data, name), what=f"StudyConfig.data.{name}")
        return files[: data.max_documents] if data.max_documents else files

    train = split("train")
    return {"train": train, "validation": split("validation"),
            "calibration": split("calibration") if data.calibration else train}


@dataclasses.dataclass(frozen=True)
class TextFiles:
    """The files a ``"text"`` data source reads: ``files`` (split -> paths as resolved) and ``sha256``
    (:func:`~evoprune._fingerprint.files_sha256` over ``split/name`` and bytes of each file)."""

    files: dict[str, tuple[str, ...]]
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "files": {k: list(v) for k, v in self.files.items()}}


def text_files(data: Any) -> TextFiles:
    """The resolved file list and sha256 of a study's ``"text"`` data settings (see
    :func:`resolve_text_files`): what a study stores so a resume reads the same files.

    >>> import tempfile, pathlib, types
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for rel in ("a/1.txt", "a/b/2.txt", "v.txt"):
    ...     (root / rel).parent.mkdir(parents=True, exist_ok=True); _ = (root / rel).write_text(rel)
    >>> data = types.SimpleNamespace(source="text", train=(str(root / "a"),), validation=(str(root / "*.txt"),),
    ...                              calibration=(), max_documents=None)
    >>> [pathlib.Path(f).name for f in text_files(data).files["train"]]
    ['1.txt', '2.txt']
    >>> len(text_files(data).sha256)
    64
    """
    if data.source != "text":
        raise ValueError(f"text_files: data source {data.source!r} has no files; only source 'text' does.")
    splits = _text_split_files(data)
    digest = files_sha256((f"{s}/{name}", path) for s in STUDY_SPLITS for name, path in splits[s])
    return TextFiles(files={s: tuple(p.as_posix() for _, p in splits[s]) for s in STUDY_SPLITS}, sha256=digest)
