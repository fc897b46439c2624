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
  study stores so that a resume reads the same files;
* :func:`load_token_file` -- a file of token ids that a ``"text"`` source reads as is (no
  tokenizer, no EOS added), chosen by its suffix: ``.pt`` (``torch.save`` of a 1-D integer
  tensor), ``.npy`` (``numpy.save`` of a 1-D integer array) or ``.bin`` (raw little-endian
  ``uint16`` / ``uint32`` ids, as nanoGPT / EvoPress write them: the dtype comes from the name,
  ``*.u16.bin`` / ``*.uint16.bin`` / ``*.u32.bin`` / ``*.uint32.bin``, else from the data option
  ``token_dtype``). Every other file is UTF-8 text; one that is not gets a one-line error naming it.

A split's stream is its files' parts in order: a text file's tokens plus EOS, a token file's ids.
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

__all__ = [
    "TOKEN_FILE_SUFFIXES",
    "TextFiles",
    "is_token_file",
    "load_splits",
    "load_token_file",
    "resolve_text_files",
    "text_files",
    "token_stream",
    "tokenized_split",
]

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
    data: Any, tokenizer: Any, *, cache_dir: str | os.PathLike[str] | None = None, vocab_size: int | None = None
) -> dict[str, torch.Tensor]:
    """``{"train", "validation", "calibration"}`` -> 1-D token streams of a study's ``data`` settings.

    ``data`` has the fields of ``evoprune.search.StudyConfig.data``: ``source``
    (``"reference"``, ``"text"`` or ``"hub"``), ``train`` / ``validation`` /
    ``calibration`` (text or token files, folders or glob patterns: :func:`resolve_text_files`,
    :func:`load_token_file`), ``token_dtype`` (``.bin`` token files), ``path`` / ``name`` / ``text_field`` /
    ``train_split`` / ``validation_split`` / ``calibration_split`` (hub) and
    ``max_documents``. Calibration defaults to the train texts. ``cache_dir``
    is where the reference corpus is cached (default: the cache root). ``vocab_size`` (the model's
    embedding rows), when given, bounds the ids of token files (one-line error naming the file).

    Raises:
        ValueError: a text file is not UTF-8, or a token file is malformed or holds ids outside
            ``[0, vocab_size)``.
    """
    if data.source == "reference":
        corpus = load_reference_corpus(cache_dir)
        return {s: tokenized_split(tokenizer, s, corpus)[0] for s in STUDY_SPLITS}
    if data.source == "text":
        import torch

        files = _text_split_files(data)
        field = {s: s if s != "calibration" or data.calibration else "train" for s in STUDY_SPLITS}
        dtype = getattr(data, "token_dtype", None)
        loaded: dict[Path, torch.Tensor] = {}

        def stream(split: str) -> torch.Tensor:
            what = f"StudyConfig.data.{field[split]}"
            parts: list[torch.Tensor] = []
            texts: list[str] = []
            for _, path in files[split]:
                if is_token_file(path):
                    if texts:
                        parts.append(token_stream(tokenizer, texts))
                        texts = []
                    key = path.resolve()
                    if key not in loaded:
                        loaded[key] = load_token_file(path, dtype=dtype, vocab_size=vocab_size, what=what)
                    parts.append(loaded[key])
                else:
                    texts.append(_read_text(path, what))
            if texts or not parts:
                parts.append(token_stream(tokenizer, texts))
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        return {s: stream(s) for s in STUDY_SPLITS}
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


# --------------------------------------------------------------------------- text and token files

#: Suffixes of token files (:func:`load_token_file`); every other file of a ``"text"`` source is UTF-8 text.
TOKEN_FILE_SUFFIXES: tuple[str, ...] = (".pt", ".npy", ".bin")
_BIN_DTYPES = {"u16": "uint16", "uint16": "uint16", "u32": "uint32", "uint32": "uint32"}
_TOKEN_HINT = "a token file (.pt, .npy, .u16.bin or .u32.bin)"


def is_token_file(path: str | os.PathLike[str]) -> bool:
    """Whether a ``"text"`` source reads ``path`` as token ids (by suffix: ``.pt``, ``.npy``, ``.bin``)."""
    return Path(path).suffix.lower() in TOKEN_FILE_SUFFIXES


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{what}: {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start}); "
            f"re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8) or pass {_TOKEN_HINT}."
        ) from None


def bin_dtype(path: str | os.PathLike[str], token_dtype: str | None = None) -> str:
    """The dtype of a raw ``.bin`` token file: from its name (``x.u16.bin``, ``x.uint32.bin``, ...),
    else ``token_dtype``; the name wins.

    >>> bin_dtype("val.u16.bin"), bin_dtype("val.bin", "uint32")
    ('uint16', 'uint32')
    """
    inner = Path(Path(path).stem).suffix.lower().lstrip(".")
    if inner in _BIN_DTYPES:
        return _BIN_DTYPES[inner]
    if token_dtype is None:
        raise ValueError(
            f"token file {path}: raw .bin ids need a dtype; name the file *.u16.bin or *.u32.bin, or set "
            "data.token_dtype to 'uint16' or 'uint32'."
        )
    if token_dtype not in ("uint16", "uint32"):
        raise ValueError(f"data.token_dtype must be 'uint16' or 'uint32', got {token_dtype!r}.")
    return token_dtype


def load_token_file(
    path: str | os.PathLike[str], *, dtype: str | None = None, vocab_size: int | None = None,
    what: str = "token file",
) -> torch.Tensor:
    """The 1-D ``torch.long`` ids of a token file, read as is (no EOS added).

    ``.pt``: a 1-D integer tensor saved with ``torch.save`` (read with ``weights_only=True``);
    ``.npy``: a 1-D integer array saved with ``numpy.save`` (no pickles); ``.bin``: raw
    little-endian ``uint16`` / ``uint32`` ids, dtype from the name or ``dtype``
    (:func:`bin_dtype`). ``vocab_size``, when given, bounds the ids.

    Raises:
        ValueError: one line naming the file: not a 1-D integer tensor/array, a ``.bin`` whose
            size is not a multiple of its dtype or whose dtype is unknown, a negative id, or an
            id ``>= vocab_size``.
    """
    import numpy as np
    import torch

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in TOKEN_FILE_SUFFIXES:
        raise ValueError(f"{what}: {p} is not a token file; use a .pt, .npy, .u16.bin or .u32.bin file.")
    if suffix == ".pt":
        try:
            value = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line error
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"{what}: token file {p} cannot be read by torch.load ({first}); save a 1-D integer "
                             "tensor with torch.save(ids, path).") from None
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{what}: token file {p} holds a {type(value).__name__}, not a tensor; save a 1-D "
                             "integer tensor with torch.save(ids, path).")
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{what}: token file {p} holds a {value.dtype} tensor of shape {tuple(value.shape)}; "
                             "save a 1-D integer tensor (flatten and concatenate the documents first).")
        ids = value.to(torch.long)
    elif suffix == ".npy":
        try:
            array = np.load(p, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"{what}: token file {p} is not a .npy array ({first}); save a 1-D integer array "
                             "with numpy.save(path, ids).") from None
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise ValueError(f"{what}: token file {p} holds a {array.dtype} array of shape {array.shape}; save a "
                             "1-D integer array (flatten and concatenate the documents first).")
        if array.dtype.kind == "u" and array.dtype.itemsize >= 8 and array.size and int(array.max()) >= 2**63:
            raise ValueError(f"{what}: token file {p} holds token id {int(array.max())}, beyond int64; write "
                             "the ids of the model's tokenizer.")
        ids = torch.from_numpy(array.astype(np.int64))
    else:
        try:
            kind = bin_dtype(p, dtype)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        size = p.stat().st_size
        item = np.dtype(kind).itemsize
        if size % item:
            raise ValueError(f"{what}: token file {p} has {size} bytes, not a multiple of {item} ({kind}); check "
                             "the dtype (the name *.u16.bin / *.u32.bin or data.token_dtype).")
        ids = torch.from_numpy(np.fromfile(p, dtype=np.dtype(kind).newbyteorder("<")).astype(np.int64))
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0:
            raise ValueError(f"{what}: token file {p} holds negative token id {low}; write the ids of the model's "
                             "tokenizer.")
        if vocab_size is not None and high >= vocab_size:
            raise ValueError(
                f"{what}: token file {p} holds token id {high} (its max id), but the model's vocabulary has "
                f"{vocab_size} entries (ids 0..{vocab_size - 1}); write the file with the model's tokenizer."
            )
    return ids


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
