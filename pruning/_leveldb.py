"""The on-disk level database: named per-layer tensors, computed once, memory-mapped when read.

A :class:`LevelDB` is one folder for one *key* (a JSON-able mapping: the model and calibration
fingerprints, the method, the level set, the storage dtype, ...): ``<root>/<digest of the key>/``
holds ``manifest.json`` (the key itself), and per decoder block ``layer-0007.safetensors`` (the
block's tensors, by name, in the storage dtype) and ``layer-0007.json`` (its byte size and sha256:
the file is finished once this exists). What the names mean is the writer's business: the level
strategy stores ``"down_proj@s0.5"``-style entries, other compressors store theirs.

* **Atomic**: a file is written to a temporary name in the same folder, flushed, ``fsync``-ed and
  renamed; the sidecar ``.json`` is written the same way after it, so a reader never sees half a
  file and a build killed at any point leaves only finished layers.
* **Resumable, two builders at once**: :meth:`LevelDB.build` takes each unfinished layer's
  ``layer-0007.lock`` with a non-blocking ``flock`` (released by the kernel when a process dies),
  re-checks, computes and stores it; a layer locked by another process is skipped and waited for.
  No layer is computed twice while its builder lives; a killed builder's layers are taken over.
* **Checked**: :meth:`LevelDB.verify` compares every finished file's size and sha256 with its
  sidecar (a mismatch: logged, the layer deleted and built again); :meth:`LevelDB.load` checks the
  size. A folder whose manifest holds another key is refused with one line.
* **Memory-mapped**: :meth:`LevelDB.load` maps the file private (copy-on-write) and pre-faulted
  (``MAP_POPULATE``: the pages come from the page cache once, not on a candidate's first forward);
  the mapped pages are the page cache's, and writing to the tensors never changes the file.

``root=None`` keeps everything in memory (the same API; nothing on disk).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .._logging import get_logger
from .._paths import cache_write_failed

__all__ = ["LEVEL_DTYPES", "LevelDB", "LevelDBError"]

_log = get_logger("pruning")

#: storage dtypes of a level database: name -> (torch dtype, safetensors code)
LEVEL_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "F32"), "float16": (torch.float16, "F16"), "bfloat16": (torch.bfloat16, "BF16"),
}
_BY_CODE = {code: dt for dt, code in LEVEL_DTYPES.values()}


class LevelDBError(ValueError):
    """A level database that cannot be used or written (the message says what to do)."""


def _digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _serialize(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> bytes:
    """safetensors bytes of ``tensors`` cast to ``dtype`` (names sorted; 8-byte aligned data)."""
    code = next(c for dt, c in LEVEL_DTYPES.values() if dt == dtype)
    header: dict[str, Any] = {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", dtype).contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((-len(head)) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


class LevelDB:
    """Per-layer named tensors for one key (see the module docs).

    Args:
        root: the folder holding databases (e.g. ``cache_folder("levels")``); ``None``: in memory.
        key: what the tensors were computed from; its digest names the folder.
        num_layers: the decoder blocks (files ``layer-0000`` ...).
        dtype: storage dtype name (:data:`LEVEL_DTYPES`).
    """

    def __init__(self, root: str | os.PathLike[str] | None, key: Mapping[str, Any], num_layers: int, *,
                 dtype: str = "float32") -> None:
        if dtype not in LEVEL_DTYPES:
            raise LevelDBError(f"level database dtype must be one of {sorted(LEVEL_DTYPES)}, got {dtype!r}.")
        self.key = json.loads(json.dumps({**key, "dtype": dtype}, sort_keys=True, default=str))
        self.digest = _digest(self.key)
        self.num_layers = int(num_layers)
        self.dtype = LEVEL_DTYPES[dtype][0]
        self.dtype_name = dtype
        self.path = None if root is None else Path(root).expanduser() / self.digest
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        self._maps: dict[int, tuple[Any, dict[str, torch.Tensor]]] = {}
        self.built_layers: list[int] = []  # layers this object computed (not loaded)
        self.build_seconds = 0.0
        if self.path is not None and (self.path / "manifest.json").exists():
            self._check_manifest()

    # -- files -----------------------------------------------------------------------------------
    def _file(self, i: int, suffix: str) -> Path:
        assert self.path is not None
        return self.path / f"layer-{i:04d}.{suffix}"

    def _check_manifest(self) -> None:
        assert self.path is not None
        try:
            stored = json.loads((self.path / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise LevelDBError(f"level database {self.path}: unreadable manifest.json ({exc}); delete the folder "
                               "to rebuild it.") from None
        if stored != self.key:
            diff = sorted(k for k in set(stored) | set(self.key) if stored.get(k) != self.key.get(k))
            raise LevelDBError(f"level database {self.path} was built for another {', '.join(diff)} (fingerprint "
                               "mismatch); delete the folder or use another cache_dir.")

    def _prepare(self) -> None:
        assert self.path is not None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / "manifest.json").exists():
                _write_atomic(self.path / "manifest.json", json.dumps(self.key, indent=1, sort_keys=True).encode())
        except Exception as exc:
            self._write_failed(exc)
        self._check_manifest()

    def _write_failed(self, exc: BaseException) -> None:
        if not cache_write_failed(exc):
            raise exc
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise LevelDBError(f"cannot write the level database at {self.path} ({reason}); free disk space or set "
                           "cache_dir to a writable folder.") from None

    def done(self, i: int) -> bool:
        """Whether layer ``i`` is finished (its sidecar exists and the file has the recorded size)."""
        if self.path is None:
            return i in self._memory
        side = self._file(i, "json")
        try:
            size = json.loads(side.read_text())["size"]
            return self._file(i, "safetensors").stat().st_size == size
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def store(self, i: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write layer ``i``'s tensors (cast to the storage dtype), atomically; replaces any earlier ones."""
        if self.path is None:
            self._memory[i] = {n: t.detach().to("cpu", self.dtype).contiguous() for n, t in tensors.items()}
            return
        if not (self.path / "manifest.json").exists():
            self._prepare()
        data = _serialize(tensors, self.dtype)
        side = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "names": sorted(tensors)}
        self._maps.pop(i, None)
        try:
            _write_atomic(self._file(i, "safetensors"), data)
            _write_atomic(self._file(i, "json"), json.dumps(side).encode())
        except Exception as exc:
            self._write_failed(exc)

    def load(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors by name, memory-mapped copy-on-write (kept open; the same dict on every call)."""
        if self.path is None:
            if i not in self._memory:
                raise LevelDBError(f"level database (in memory): layer {i} was never built; call build() first.")
            return self._memory[i]
        if i in self._maps:
            return self._maps[i][1]
        if not self.done(i):
            raise LevelDBError(f"level database {self.path}: layer {i} is missing or truncated; build it again.")
        with open(self._file(i, "safetensors"), "rb") as f:  # private (copy-on-write), pre-faulted where Linux can
            mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        (n,) = struct.unpack("<Q", mm[:8])
        header = json.loads(mm[8 : 8 + n])
        out: dict[str, torch.Tensor] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt = _BY_CODE[info["dtype"]]
            b, e = info["data_offsets"]
            count = (e - b) // torch.empty((), dtype=dt).element_size()
            flat = torch.frombuffer(mm, dtype=dt, count=count, offset=8 + n + b) if count else torch.empty(0, dtype=dt)
            out[name] = flat.view(info["shape"])
        self._maps[i] = (mm, out)
        return out

    def verify(self, layers: Iterable[int]) -> list[int]:
        """Check every finished layer of ``layers`` against its sidecar's sha256; delete and return the bad ones."""
        bad: list[int] = []
        if self.path is None:
            return bad
        for i in layers:
            if not self.done(i):
                continue
            side = json.loads(self._file(i, "json").read_text())
            h = hashlib.sha256()
            with open(self._file(i, "safetensors"), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            if h.hexdigest() != side.get("sha256"):
                _log.warning("level database %s: layer %d does not match its checksum; rebuilding it", self.path, i)
                self._maps.pop(i, None)
                for suffix in ("json", "safetensors"):
                    with contextlib.suppress(FileNotFoundError):
                        self._file(i, suffix).unlink()
                bad.append(i)
        return bad

    @contextlib.contextmanager
    def _lock(self, i: int):
        """Yields whether this process holds layer ``i``'s build lock (non-blocking)."""
        if self.path is None:
            yield True
            return
        try:
            fd = os.open(self._file(i, "lock"), os.O_CREAT | os.O_RDWR, 0o644)
        except Exception as exc:
            self._write_failed(exc)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def build(self, layers: Iterable[int], compute: Callable[[int], Mapping[str, torch.Tensor]], *,
              progress: Callable[[int], None] | None = None, poll_s: float = 0.2, ordered: bool = False) -> list[int]:
        """Make every layer of ``layers`` finished: verified ones are kept, the rest computed with
        ``compute(i)`` (a mapping of name -> tensor) and stored, each under its lock; layers another
        process is building are waited for. ``progress(k)`` is called as layers finish. Returns the
        layers this call computed.

        ``ordered``: ``layers`` are finished in ascending order, each before the next is begun (a layer
        another process holds is waited for, or taken over when its builder dies), for a ``compute``
        that reads the earlier layers' stored tensors (sequential SparseGPT inputs)."""
        layers = sorted(layers) if ordered else list(layers)
        start = time.perf_counter()
        if self.path is not None:
            self._prepare()
            self.verify(layers)
        pending = [i for i in layers if not self.done(i)]
        finished = len(layers) - len(pending)
        if progress is not None and finished:
            progress(finished)
        built: list[int] = []
        for i in (pending if ordered else []):
            while not self.done(i):
                with self._lock(i) as held:
                    if held:
                        if not self.done(i):
                            self.store(i, compute(i))
                            built.append(i)
                        break
                time.sleep(poll_s)
            if progress is not None:
                progress(1)
        pending = [] if ordered else pending
        while pending:
            moved = False
            for i in list(pending):
                if self.done(i):
                    pending.remove(i)
                    moved = True
                    if progress is not None:
                        progress(1)
                    continue
                with self._lock(i) as held:
                    if not held:
                        continue
                    if not self.done(i):
                        self.store(i, compute(i))
                        built.append(i)
                pending.remove(i)
                moved = True
                if progress is not None:
                    progress(1)
            if pending and not moved:
                time.sleep(poll_s)
        self.built_layers += built
        self.build_seconds += time.perf_counter() - start
        return built

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (files on disk, or the in-memory tensors)."""
        if self.path is None:
            return sum(t.numel() * t.element_size() for d in self._memory.values() for t in d.values())
        return sum(self._file(i, "safetensors").stat().st_size for i in range(self.num_layers) if self.done(i))

    def info(self) -> dict[str, Any]:
        """What a study records about the database: where, key digest, dtype, bytes, build seconds."""
        return {"path": None if self.path is None else str(self.path), "digest": self.digest,
                "dtype": self.dtype_name, "bytes": self.nbytes, "build_seconds": round(self.build_seconds, 3),
                "built_layers": len(self.built_layers), "method": self.key.get("method")}
