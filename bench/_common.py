"""Setup shared by the bench scripts.

Each ``bench/NAME.py`` runs standalone (``python bench/NAME.py``); Python puts
``bench/`` first on ``sys.path``, so ``import _common`` finds this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

import numpy as np
import torch


# A tiny random-init Llama for the ``--smoke`` runs of the benches that do not need trained weights.
TINY_SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None = None, *, smoke: dict[str, Any]) -> argparse.Namespace:
    """Parse ``argv`` with a ``--smoke`` flag: a seconds-long run (tiny model, small counts) that still
    prints the bench's table and every TARGET line (which may then FAIL); ``tests/bench`` runs every
    bench this way. ``smoke`` holds the argument values of the smoke size (flags given explicitly win)."""
    sizes = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in smoke.items() if not k.startswith("_"))
    ap.add_argument("--smoke", action="store_true",
                    help=f"a seconds-long run on a tiny model that still prints every TARGET line ({sizes})")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--smoke" in argv:
        ap.set_defaults(**smoke)
    return ap.parse_args(argv)


def tiny_llama(seed: int = 0) -> Any:
    """A random-init Llama of :data:`TINY_SHAPE` (fp32, eval mode)."""
    import transformers

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY_SHAPE),
                                                         dtype=torch.float32).eval()


def add_common_args(ap: argparse.ArgumentParser, *, model: str | None = "reference:small", seq_len: int = 128,
                    threads: int = 2, device: bool = False) -> argparse.ArgumentParser:
    """``--seed``, ``--threads``, ``--seq-len`` (and ``--model`` / ``--device`` when asked for)."""
    if model is not None:
        ap.add_argument("--model", default=model, help="model id or path, or reference:tiny|small")
    ap.add_argument("--seq-len", type=int, default=seq_len)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=threads,
                    help="intra-op threads (1 keeps timings steady on a shared 2-core machine)")
    if device:
        ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def add_reference_args(ap: argparse.ArgumentParser, *, candidates: int) -> argparse.ArgumentParser:
    """``--size``, ``--candidates``, ``--budget``, ``--batch-size`` of the benches on random candidates
    of the reference model (see :func:`reference_setup`)."""
    ap.add_argument("--size", default="small", help="reference model size (tiny|small)")
    ap.add_argument("--candidates", type=int, default=candidates)
    ap.add_argument("--budget", type=float, default=0.5, help="max params ratio (min is budget - 0.05)")
    ap.add_argument("--batch-size", type=int, default=8)
    return ap


def start(args: argparse.Namespace) -> float:
    """Apply ``--threads``, quiet Optuna's per-trial logging; returns the start time (``time.time()``)."""
    import optuna

    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return time.time()


def distinct_random(space: Any, n: int, seed: int) -> list[Any]:
    """``n`` distinct random candidates of ``space`` (seeded)."""
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n:
            raise RuntimeError(f"the space has fewer than {n} distinct candidates in its budget; ask for fewer.")
        c = space.random(rng)
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


@dataclasses.dataclass
class ReferenceSetup:
    """The reference model on ``device`` with its data, a pruner and a budget-band space."""

    model: Any
    tokenizer: Any
    pruner: Any
    space: Any
    eval_ids: torch.Tensor
    eval_fingerprint: str
    train_ids: torch.Tensor | None
    train_fingerprint: str


def reference_setup(size: str, *, seq_len: int, budget: float, device: torch.device, train: bool = False,
                    calib_sequences: int = 32) -> ReferenceSetup:
    """Build (cached) the reference model of ``size``, its pruner (calibrated on the calibration
    split) and a space with ``drop_blocks`` and a params budget in ``[budget - 0.05, budget]``."""
    import transformers

    from evoprune.data import build_reference_model, load_reference_corpus, tokenized_split
    from evoprune.pruning import Pruner
    from evoprune.space import Budget, SearchSpace

    path = build_reference_model(size, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval().to(device)
    corpus = load_reference_corpus()
    eval_ids, eval_fp = tokenized_split(tok, "validation", corpus)
    calib_ids, calib_fp = tokenized_split(tok, "calibration", corpus)
    train_ids, train_fp = tokenized_split(tok, "train", corpus) if train else (None, "-")
    n_cal = min(calib_sequences, calib_ids.numel() // seq_len)
    calib = calib_ids[: n_cal * seq_len].view(n_cal, seq_len).to(device)
    pruner = Pruner(model, calib, data_fingerprint=calib_fp)
    space = SearchSpace.from_model(
        model, drop_blocks=True, budget=Budget(metric="params", max_ratio=budget, min_ratio=budget - 0.05)
    )
    return ReferenceSetup(model=model, tokenizer=tok, pruner=pruner, space=space, eval_ids=eval_ids,
                          eval_fingerprint=eval_fp, train_ids=train_ids, train_fingerprint=train_fp)


def print_targets(targets) -> None:
    """The closing ``TARGET <name> <value> <op> <limit> PASS|FAIL`` lines, one per ``(name, value, op, limit)``."""
    for name, value, op, limit in targets:
        ok = value <= limit if op == "<=" else value >= limit
        print(f"TARGET {name} {value:.4g} {op} {limit} {'PASS' if ok else 'FAIL'}")
