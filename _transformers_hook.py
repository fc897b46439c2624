"""Post-import hook: after ``import evoprune``, plain transformers Auto classes load evoprune exports.

``import evoprune`` must stay cheap (no torch, no transformers import), so it only calls
:func:`install`. Exports that stock transformers cannot build have ``model_type="evoprune_<dense>"``
(see :mod:`evoprune.pruning._auto`). Once transformers' config registry
(``transformers.models.auto.configuration_auto``, imported by every ``Auto*`` class and
``from_pretrained``) has been executed -- at once if it already was, else through a
``sys.meta_path`` finder that waits for it and then removes itself -- its ``CONFIG_MAPPING``
learns to resolve ``evoprune_*`` keys on first lookup: the lookup calls
:func:`evoprune.pruning._auto.resolve_pruned_model_type`, which registers the config class with
``AutoConfig.register`` (and the causal-LM class follows when a config of the type is built).

Nothing is registered while transformers is still importing itself (its modules are then often
partly initialized); the resolution runs when a config is looked up. This module is the one place
that touches a private transformers attribute (``CONFIG_MAPPING._extra_content``, a plain dict of
registered configs); ``tests/pruning/test_export_auto.py`` fails if a transformers release changes it.
Where it is missing, :func:`evoprune.register_auto_classes` registers eagerly instead.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
from typing import Any

__all__ = ["PRUNED_MODEL_TYPE_PREFIX", "TARGET_MODULE", "install"]

TARGET_MODULE = "transformers.models.auto.configuration_auto"

PRUNED_MODEL_TYPE_PREFIX = "evoprune_"
"""``model_type`` of an export that only evoprune can build: this prefix + the dense ``model_type``."""

_local = threading.local()


def _log() -> Any:
    from ._logging import get_logger

    return get_logger("pruning")


class _LazyPrunedConfigs(dict):
    """``CONFIG_MAPPING._extra_content`` that registers ``evoprune_<type>`` config classes on first lookup."""

    _evoprune_lazy = True  # marks every copy (this file imported under another name too)

    def _resolve(self, key: Any) -> None:
        if not isinstance(key, str) or not key.startswith(PRUNED_MODEL_TYPE_PREFIX) or dict.__contains__(self, key):
            return
        busy = getattr(_local, "busy", None)
        if busy is None:
            busy = _local.busy = set()
        if key in busy:
            return
        busy.add(key)
        try:
            # absolute: the one evoprune.pruning, even if this file was also imported under another name
            importlib.import_module("evoprune.pruning._auto").resolve_pruned_model_type(key)
        except Exception as exc:  # transformers then says it does not recognize the type (loud)
            _log().warning("could not register %s with transformers: %s", key, exc)
        finally:
            busy.discard(key)

    def __contains__(self, key: Any) -> bool:
        self._resolve(key)
        return dict.__contains__(self, key)

    def __getitem__(self, key: Any) -> Any:
        self._resolve(key)
        return dict.__getitem__(self, key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._resolve(key)
        return dict.get(self, key, default)


def _patch_config_registry(module: Any) -> bool:
    """Make ``module.CONFIG_MAPPING`` resolve ``evoprune_*`` keys lazily; ``False`` if it cannot."""
    mapping = getattr(module, "CONFIG_MAPPING", None)
    extra = getattr(mapping, "_extra_content", None)
    if getattr(extra, "_evoprune_lazy", False):
        return True
    if type(extra) is not dict:
        _log().warning(
            "this transformers version's CONFIG_MAPPING has no plain _extra_content dict; call "
            "evoprune.register_auto_classes() before loading evoprune exports with AutoModelForCausalLM")
        return False
    mapping._extra_content = _LazyPrunedConfigs(extra)
    return True


class _HookedLoader(importlib.abc.Loader):
    """Delegates to the real loader and patches the config registry right after it has executed."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        module.__loader__ = self._loader  # introspection (inspect.getsource) sees the real loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        _uninstall()
        try:
            _patch_config_registry(module)
        except Exception as exc:  # never break the user's transformers import
            _log().warning("could not hook evoprune into transformers' config registry: %s", exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    _evoprune_hook = True  # marks every copy (a second import of this module under another name)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TARGET_MODULE:
            return None
        for finder in list(sys.meta_path):
            if getattr(finder, "_evoprune_hook", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookedLoader(spec.loader)
        return spec


_finder = _Finder()


def _uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "_evoprune_hook", False)]


def install() -> None:
    """Hook evoprune into transformers' config registry now if it is imported, else once it is."""
    module = sys.modules.get(TARGET_MODULE)
    if module is not None and hasattr(module, "CONFIG_MAPPING"):
        _patch_config_registry(module)
    elif not any(getattr(f, "_evoprune_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _finder)
