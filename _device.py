"""The one home of "which device and dtype does this worker run on", checked before any weight loads.

A study's ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``) and ``dtype``
(``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"``) come from its config, or per worker
from ``--device`` / ``--devices`` (a machine setting: ``evoprune worker --device cuda:3`` runs
the stored study on GPU 3). :func:`check_device` and :func:`check_dtype` turn a device that does
not exist or a dtype the device cannot compute in into one line that says what to do, before
``build_runtime`` loads anything and before a database row is written::

    >>> resolve_device("cpu"), torch_dtype_name("auto")
    ('cpu', 'float32')
    >>> check_device("gpu:0")
    Traceback (most recent call last):
    ...
    ValueError: device 'gpu:0' is not a torch device; use cpu, cuda, cuda:N (N = 0 .. number of GPUs - 1), mps or auto.
    >>> parse_devices("0,1, 3")
    ['cuda:0', 'cuda:1', 'cuda:3']

The dtype probe runs what a search runs in that dtype -- a matmul, ``log_softmax`` in float32 of
the result, and one backward step -- on a few numbers on the device, so a missing kernel (float16
on an old CPU build, bfloat16 on a pre-Ampere GPU) shows up here and not in the middle of a search.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["DTYPE_BYTES", "check_device", "check_dtype", "parse_devices", "resolve_device", "torch_dtype",
           "torch_dtype_name"]

#: bytes per element of each study dtype (``auto`` resolves first: :func:`torch_dtype_name`)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; other names unchanged."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def torch_dtype_name(dtype: str, model_config: Any = None) -> str:
    """The concrete dtype name of a study dtype: ``"auto"`` is the checkpoint's own (``dtype`` /
    ``torch_dtype`` in its ``config.json``, as transformers' ``from_pretrained(dtype="auto")``),
    float32 when the config names none.

    >>> torch_dtype_name("auto", {"torch_dtype": "bfloat16"}), torch_dtype_name("float16")
    ('bfloat16', 'float16')
    """
    if dtype != "auto":
        return dtype
    get = model_config.get if isinstance(model_config, dict) else lambda k: getattr(model_config, k, None)
    for key in ("dtype", "torch_dtype"):
        value = get(key) if model_config is not None else None
        value = str(value).replace("torch.", "") if value is not None else None
        if value in DTYPE_BYTES:
            return value
    return "float32"


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16`` (``"auto"`` stays ``"auto"``, for ``from_pretrained``)."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}[name]


def parse_devices(text: str) -> list[str]:
    """``--devices 0,1,3`` (GPU indices) or ``cpu,cpu`` / ``cuda:0,cuda:1`` -> device names."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"--devices must be a comma-separated list such as 0,1,2,3 or cuda:0,cuda:1, got {text!r}.")
        out.append(f"cuda:{part}" if part.isdigit() else part)
    return out


def check_device(name: str) -> str:
    """The resolved device name, or a one-line ``ValueError`` when it does not exist on this machine."""
    import torch

    dev = resolve_device(name)
    try:
        d = torch.device(dev)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {name!r} is not a torch device; use cpu, cuda, cuda:N (N = 0 .. number of GPUs - 1), "
                         "mps or auto.") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {name!r} is not available: {why} (torch {torch.__version__}); use device cpu, "
                             "or run on a machine with a GPU (and a CUDA build of torch).")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise ValueError(f"device {name!r} does not exist: this machine has {n} CUDA GPU{'s' if n != 1 else ''} "
                             f"(cuda:0 .. cuda:{n - 1}); pick one of those.")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} is not available on this machine; use cpu (or cuda on a GPU machine).")
    elif d.type != "cpu":
        raise ValueError(f"device {name!r}: evoprune runs on cpu, cuda[:N] or mps; use one of those.")
    return dev


def check_dtype(dtype: str, device: str, model_config: Any = None) -> str:
    """The concrete dtype name (``"auto"``: see :func:`torch_dtype_name`), or a one-line
    ``ValueError`` when ``device`` cannot compute in it.

    Probes on the device: a matmul, float32 ``log_softmax`` of its result, and a backward pass
    (what the KL evaluator, calibration and fine-tuning do in that dtype)."""
    return _probe(torch_dtype_name(dtype, model_config), check_device(device))


@functools.lru_cache(maxsize=None)
def _probe(name: str, dev: str) -> str:
    import torch

    dt = torch_dtype(name)
    if dev.startswith("cuda") and name == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype bfloat16 is not supported on {dev} ({torch.cuda.get_device_name(dev)}); "
                         "use dtype float16 or float32.")
    try:
        w = torch.ones(8, 8, dtype=dt, device=dev, requires_grad=True)
        x = torch.ones(4, 8, dtype=dt, device=dev)
        y = torch.nn.functional.silu(x @ w)
        torch.log_softmax(y.float(), dim=-1).sum().backward()
        if w.grad is None or not bool(torch.isfinite(w.grad.float()).all()):
            raise RuntimeError("the probe's gradient is not finite")
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"dtype {name} cannot run on {dev} ({first[:160]}); use dtype float32"
                         + (" or bfloat16" if name == "float16" else "") + ".") from None
    return name
