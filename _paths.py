"""The one cache root of evoprune (downloads, the reference corpus and models, importance
scores, dense reference logits all live under it)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


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
