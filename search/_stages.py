"""Stage schedule -> evaluators and :class:`~evoprune.evaluators.Pipeline` (one place).

Config evaluator specs are ``{"type": ..., "name": ..., **options}``; a type is a built-in
(``kl``, ``ppl``, ``latency``, ``cost``, ``lm_eval``) or an import path ``"pkg.mod:Class"``
(:func:`load_object`). An evaluator's default name is its type.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from .. import evaluators as ev
from ._config_parts import parse_promote

__all__ = ["build_evaluator", "build_pipeline", "load_object"]


def load_object(path: str) -> Any:
    """Import ``"pkg.module:Name"`` (or ``"pkg.module.Name"``)."""
    if ":" in path:
        module, _, name = path.partition(":")
    else:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise ValueError(f"{path!r} is not an import path; write it as 'package.module:ClassName'.")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module!r} of {path!r}: {exc}") from None
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module!r} has no {name!r} (from {path!r}).") from None
    return obj


def build_evaluator(spec: Mapping[str, Any]) -> Any:
    """The evaluator of one normalized config spec (``{"type": ..., "name": ..., **options}``)."""
    spec = dict(spec)
    t = spec.pop("type")
    name = spec.pop("name", None)
    builtin = {"kl": ev.KLToDense, "ppl": ev.Perplexity, "latency": ev.Latency}.get(t)
    if builtin is not None:  # their default name is their type
        return builtin(**spec) if name is None else builtin(name=name, **spec)
    if t == "cost":
        return ev.Cost(name=name, **spec)
    if t == "lm_eval":
        tasks = spec.pop("tasks")
        return ev.LMEval(tasks, name=name, **spec)
    cls = load_object(t)
    return cls(name=name, **spec) if name is not None else cls(**spec)


def build_pipeline(stages: Sequence[Any]) -> Any:
    """The :class:`~evoprune.evaluators.Pipeline` of a stage schedule (:class:`StageConfig` objects)."""

    out = []
    for s in stages:
        promote = None
        if s.promote is not None:
            kind, kwargs = parse_promote(s.promote, f"stages[{s.name!r}].promote")
            promote = {"top_k": ev.TopK, "top_fraction": ev.TopFraction, "race": ev.Race}[kind](**kwargs)
        out.append(
            ev.Stage(
                name=s.name,
                evaluators=tuple(build_evaluator(e) for e in s.evaluators),
                eval_tokens=s.eval_tokens,
                seq_len=s.seq_len,
                finetune_tokens=s.finetune_tokens,
                finetune=dict(s.finetune),
                promote=promote,
                objective=s.objective,
                extends=s.extends,
            )
        )
    return ev.Pipeline(out)
