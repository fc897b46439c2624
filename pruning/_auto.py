"""transformers Auto-class registration for exports that stock transformers cannot build.

An export whose blocks differ in width, or that drops attention/MLP sublayers, gets
``model_type = "evoprune_<dense type>"`` (e.g. ``evoprune_llama``) in its ``config.json``.
Stock transformers rejects that type loudly (``... has model type `evoprune_llama` but
Transformers does not recognize this architecture``) instead of building dense-shaped
blocks and randomly initialising the missing weights. With evoprune imported, each such
type maps to a config class (a subclass of the dense one) and a causal-LM class (a subclass
of the dense one whose constructor builds every block from ``per_layer_config`` inside
:func:`~evoprune.pruning.per_layer_modules`), registered with ``AutoConfig.register`` /
``AutoModelForCausalLM.register``. So plain ``AutoModelForCausalLM.from_pretrained(export)``
works after ``import evoprune``.

When registration happens:

* ``import evoprune`` installs a post-import hook (:mod:`evoprune._transformers_hook`, no torch
  import): transformers' ``CONFIG_MAPPING`` then resolves an ``evoprune_<type>`` key on its first
  lookup (:func:`resolve_pruned_model_type`), for every type with a registered adapter;
* :func:`register_auto_classes` registers eagerly (idempotent; explicit use is only needed where
  the hook cannot work, e.g. a transformers release that changed its registry);
* :func:`~evoprune.pruning.load_pruned` and ``Pruner.export`` register what they need themselves.

A causal-LM class is created and registered when a config of its type is first constructed, so
only the modeling module that is needed gets imported.
"""

from __future__ import annotations

import threading
from typing import Any

from .._logging import get_logger
from .._transformers_hook import PRUNED_MODEL_TYPE_PREFIX
from ..space import find_arch
from ._adapters import ArchAdapter, get_adapter, registered_adapters
from ._modules import per_layer_modules
from ._placeholders import unexpected_patterns

__all__ = [
    "PRUNED_MODEL_TYPE_PREFIX",
    "dense_model_type",
    "pruned_config_class",
    "pruned_model_class",
    "pruned_model_type",
    "register_auto_classes",
    "resolve_pruned_model_type",
]

_log = get_logger("pruning")
_lock = threading.RLock()
_config_classes: dict[str, type] = {}  # dense model_type -> registered config class
_model_classes: dict[str, type] = {}  # dense model_type -> registered causal-LM class


def pruned_model_type(dense_type: str) -> str:
    """``"llama"`` -> ``"evoprune_llama"``."""
    return PRUNED_MODEL_TYPE_PREFIX + dense_type


def dense_model_type(model_type: str | None) -> str | None:
    """``"evoprune_llama"`` -> ``"llama"``; ``None`` for a type without the prefix."""
    if isinstance(model_type, str) and model_type.startswith(PRUNED_MODEL_TYPE_PREFIX):
        return model_type[len(PRUNED_MODEL_TYPE_PREFIX):] or None
    return None


def _config_post_init(dense_type: str):
    def __post_init__(self, **kwargs: Any) -> None:
        super(_config_classes[dense_type], self).__post_init__(**kwargs)
        try:  # the model class is needed as soon as a config of this type exists
            pruned_model_class(dense_type)
        except Exception as exc:  # AutoModel* will then say the config class is unrecognized (loud)
            _log.warning("could not register the causal-LM class for %s: %s", pruned_model_type(dense_type), exc)

    return __post_init__


def pruned_config_class(dense_type: str) -> type:
    """The (registered) config class of ``evoprune_<dense_type>`` exports: a subclass of the dense one."""
    with _lock:
        cls = _config_classes.get(dense_type)
        if cls is not None:
            return cls
        # deferred: this module is imported while transformers may still be importing itself (the hook)
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

        if dense_type not in CONFIG_MAPPING:
            raise ValueError(
                f"transformers has no config class for model_type={dense_type!r}; evoprune can only register "
                "pruned variants of architectures transformers knows (upgrade transformers or register the dense one)."
            )
        base = CONFIG_MAPPING[dense_type]
        name = f"Evoprune{base.__name__}"
        ignore = list(getattr(base, "_keys_to_ignore_on_load_unexpected", None) or []) + unexpected_patterns(dense_type)
        cls = type(name, (base,), {
            "_keys_to_ignore_on_load_unexpected": ignore,  # the placeholders of dropped sublayers
            "model_type": pruned_model_type(dense_type),
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"Config of a non-uniform {base.__name__} exported by evoprune (load it with evoprune).",
            "__post_init__": _config_post_init(dense_type),
        })
        _config_classes[dense_type] = cls
        globals()[name] = cls  # importable by name (pickling, repr)
        AutoConfig.register(cls.model_type, cls, exist_ok=True)
        return cls


def pruned_model_class(dense_type: str) -> type:
    """The (registered) causal-LM class of ``evoprune_<dense_type>`` exports.

    A subclass of the dense architecture's ``AutoModelForCausalLM`` class whose constructor builds
    each block from ``config.per_layer_config`` (see :func:`~evoprune.pruning.per_layer_modules`).
    """
    with _lock:
        cls = _model_classes.get(dense_type)
        if cls is not None:
            return cls
        get_adapter(dense_type)  # without an adapter per_layer_modules cannot build the blocks: say so
        config_cls = pruned_config_class(dense_type)
        from transformers import AutoModelForCausalLM  # deferred, as above
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        dense_config_cls = config_cls.__mro__[1]
        if dense_config_cls not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ValueError(f"transformers has no causal-LM class for model_type={dense_type!r}.")
        base = MODEL_FOR_CAUSAL_LM_MAPPING[dense_config_cls]
        if isinstance(base, (list, tuple)):
            base = base[0]
        def __init__(self, config, *args: Any, **kwargs: Any) -> None:
            with per_layer_modules():
                base.__init__(self, config, *args, **kwargs)

        name = f"Evoprune{base.__name__}"
        ignore = list(getattr(base, "_keys_to_ignore_on_load_unexpected", None) or []) + unexpected_patterns(dense_type)
        cls = type(name, (base,), {
            "_keys_to_ignore_on_load_unexpected": ignore,  # the placeholders of dropped sublayers
            "config_class": config_cls,
            "__init__": __init__,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"A non-uniform {base.__name__} exported by evoprune: each block follows per_layer_config.",
        })
        _model_classes[dense_type] = cls
        globals()[name] = cls
        AutoModelForCausalLM.register(config_cls, cls, exist_ok=True)
        return cls


def resolve_pruned_model_type(model_type: str) -> type | None:
    """Register and return the config class of ``model_type`` (``"evoprune_llama"``), or ``None``
    when it is not ``evoprune_<type>`` of a registered adapter (transformers then rejects it)."""
    dense = dense_model_type(model_type)
    if dense is None or not isinstance(find_arch(dense), ArchAdapter):
        return None
    return pruned_config_class(dense)


def register_auto_classes(model_types: Any = None) -> tuple[str, ...]:
    """Register ``evoprune_<type>`` with transformers' ``AutoConfig``/``AutoModelForCausalLM``.

    Args:
        model_types: dense ``model_type`` strings; ``None`` = every registered adapter's type
            (types transformers does not know are skipped).

    Returns the registered ``evoprune_*`` model types. Idempotent and cheap after the first call
    (config classes only; each model class follows when a config of its type is first built).

    Example::

        >>> import evoprune
        >>> "evoprune_llama" in evoprune.register_auto_classes()
        True
    """
    explicit = model_types is not None
    types = tuple(model_types) if explicit else tuple(a.model_type for a in registered_adapters())
    done = []
    for t in types:
        try:
            done.append(pruned_config_class(t).model_type)
        except ValueError:
            if explicit:
                raise
            _log.debug("no transformers config class for %s; not registering %s", t, pruned_model_type(t))
    return tuple(done)
