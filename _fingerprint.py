"""The one home of evoprune's content fingerprints: models, token ids and folders.

Study databases store these strings (``runtime.fingerprints``) and compare them
on resume, and caches are keyed by them, so their values must never change:
``tests/data/test_fingerprint.py`` pins them.

* :func:`model_fingerprint` -- 16 hex chars from a dense model's config and weights;
* :func:`ids_fingerprint` -- sha256 of token ids as little-endian int64 (16 hex chars
  by default, ``chars=64`` for the whole digest);
* :func:`directory_sha256` -- sha256 over a folder's files (an exported checkpoint);
* :func:`files_sha256` -- sha256 over named files in a given order (a study's text data files).

torch is imported only when a tensor is fingerprinted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["directory_sha256", "files_sha256", "ids_fingerprint", "model_fingerprint"]

#: config keys that name where or with what a model was saved, not what it is
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version")


def model_fingerprint(model: torch.nn.Module, *, samples_per_tensor: int = 4096) -> str:
    """A digest (hex, 16 chars) of a model's config and weights.

    Hashes the config JSON (without ``_name_or_path`` and
    ``transformers_version``) and, for every parameter (tied ones under each
    name) and buffer, its name, shape, dtype, ``samples_per_tensor`` evenly
    strided values and the float64 sum of all values. Compute it on the
    *dense* model (before any candidate is applied). One pass over the
    weights; cheap next to a forward pass on the evaluation tokens.

    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    >>> model_fingerprint(a) == model_fingerprint(a), model_fingerprint(a) == model_fingerprint(b)
    (True, False)
    """
    import torch

    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        try:
            cfg = config.to_dict()
        except Exception:  # pragma: no cover - exotic configs
            cfg = {}
        cfg = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
        for name, t in tensors:
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            flat = t.detach().reshape(-1)
            if flat.numel() == 0:
                continue
            step = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::step][:samples_per_tensor].to("cpu", torch.float64)
            h.update(sample.numpy().tobytes())
            h.update(repr(float(flat.to(torch.float64).sum())).encode())
    return h.hexdigest()[:16]


def ids_fingerprint(ids: torch.Tensor, *, chars: int = 16) -> str:
    """sha256 (hex, first ``chars`` of 64) of token ids' values as little-endian int64.

    Only the values in row-major order count, not the shape or integer dtype.

    >>> import torch
    >>> ids_fingerprint(torch.arange(1000) % 97)
    '2367ac2fae46aa0c'
    >>> ids_fingerprint((torch.arange(1000) % 97).int().view(10, 100), chars=24)
    '2367ac2fae46aa0c9e2d6de5'
    """
    import numpy as np
    import torch

    arr = ids.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:chars]


def files_sha256(files: Iterable[tuple[str, str | os.PathLike[str]]]) -> str:
    """sha256 over ``(name, path)`` pairs in the given order: each file's name, size and bytes.

    The names (e.g. paths relative to a data folder) stand for where the files are, so the digest
    changes when a file is added, removed, renamed or edited, and not when the folder moves.
    """
    h = hashlib.sha256()
    for name, path in files:
        f = Path(path)
        h.update(f"{name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def directory_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 over a folder's files (relative path, size and bytes, in sorted order).

    A single file is hashed the same way under its own name.
    """
    root = Path(path)
    if not root.is_dir():
        return files_sha256([(root.name, root)])
    return files_sha256((f.relative_to(root).as_posix(), f) for f in sorted(p for p in root.rglob("*") if p.is_file()))
