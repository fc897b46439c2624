"""The one cache root of evoprune (downloads, the reference corpus and models, importance
scores, dense reference logits all live under it)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["CACHE_FOLDERS", "atomic_folder", "cache_folder", "cache_root", "new_folder"]

#: the cache root's sub-folders, each written by one room: reference models (``data``), downloaded
#: wheels (``data``), importance scores (``pruning``, through the runtime), dense reference logits
#: (``evaluators``), per-host run files (``_threads``), level databases (``pruning``: compressed levels through
#: the runtime, fitted linear replacements next to the pruner's importance folder)
CACHE_FOLDERS: tuple[str, ...] = ("models", "downloads", "importance", "dense_reference", "run", "levels")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where evoprune caches downloads, corpora, reference models and scores.

    ``cache_dir`` if given, else ``$EVOPRUNE_CACHE_DIR``, else
    ``platformdirs.user_cache_dir("evoprune")``; always absolute, ``~`` expanded.

    >>> str(cache_root("/tmp/evoprune/../evoprune-cache"))
    '/tmp/evoprune-cache'
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get("EVOPRUNE_CACHE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_cache_dir("evoprune")).resolve()


def cache_folder(kind: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<cache root>/<kind>``: the one layout of the cache's sub-folders (:data:`CACHE_FOLDERS`).

    >>> cache_folder("dense_reference", "/tmp/c").as_posix()
    '/tmp/c/dense_reference'
    """
    if kind not in CACHE_FOLDERS:
        raise ValueError(f"unknown cache folder {kind!r}; use one of {CACHE_FOLDERS}.")
    return cache_root(cache_dir) / kind


def is_disk_full(exc: BaseException) -> bool:
    """Did a write fail for lack of space (ENOSPC, EDQUOT, EFBIG), also as safetensors or ``torch.save``
    report it?

    >>> is_disk_full(OSError(28, "No space left on device"))
    True
    >>> is_disk_full(RuntimeError("Error while serializing: I/O error: File too large (os error 27)"))
    True
    >>> is_disk_full(PermissionError(13, "Permission denied"))
    False
    """
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("no space left", "file too large", "disk quota"))


def cache_write_failed(exc: BaseException) -> bool:
    """Is ``exc`` a cache file that could not be written (full disk, quota, read-only folder), however
    the writer (``os``, safetensors, ``torch.save``) reports it? Callers then go on without the cache.

    >>> cache_write_failed(OSError(13, "Permission denied"))
    True
    >>> cache_write_failed(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))
    True
    >>> cache_write_failed(RuntimeError("The size of tensor a (4) must match the size of tensor b (3)"))
    False
    """
    if isinstance(exc, OSError) or is_disk_full(exc):
        return True
    text = str(exc).lower()
    # torch.save reports a failed write as "unexpected pos"
    return any(s in text for s in ("read-only file system", "i/o error", "write failed", "unexpected pos"))


def new_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` as a :class:`Path` after checking it is free: missing or an empty folder (else
    :class:`FileExistsError` saying what to do)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder; choose a new export folder.")
    return path


def _umask_modes(folder: Path) -> None:
    """Give every file under ``folder`` the mode a plain ``open()`` would (``0o666`` less the umask):
    some writers (safetensors through a temporary file) leave ``0600`` while the others are ``0644``."""
    umask = os.umask(0o022)
    os.umask(umask)
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~umask)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a folder all at once: yields a sibling ``.NAME.partial-PID`` folder (created) that
    replaces ``path`` (missing or the empty folder a caller made) when the block ends. On any error
    the partial folder is removed -- a full disk or a kill mid-write leaves no half-written folder
    at ``path`` -- and a full disk is re-raised as a one-line :class:`OSError` saying what to do.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with atomic_folder(root / "out") as tmp:
    ...     _ = (tmp / "a.txt").write_text("x")
    >>> sorted(p.name for p in root.iterdir()), (root / "out" / "a.txt").read_text()
    (['out'], 'x')
    """
    import shutil

    path = new_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        _umask_modes(partial)
        if path.exists():
            path.rmdir()  # the empty folder the caller made
        os.replace(partial, path)
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if is_disk_full(exc):
            raise OSError(f"could not write {path}: {str(exc).strip()}; free disk space or choose another "
                          "folder (nothing was written).") from exc
        raise
