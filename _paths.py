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
