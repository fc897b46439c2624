"""Pruning backend: importance scores, in-place apply/revert, materialize, export and load.

A :class:`Pruner` scores heads, KV groups and MLP channels once (cached on disk),
permutes the dense model so the most important come first, and then turns any
:class:`~evoprune.space.Candidate` into the live model in place (views, no
copy) or into a new, physically smaller model::

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from evoprune.space import Candidate, LayerConfig, ModelSpec
    from evoprune.pruning import Pruner, load_pruned

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B")
    calib = torch.randint(0, model.config.vocab_size, (32, 256))   # [n, seq_len] real text in practice
    pruner = Pruner(model, calib, cache_dir=".cache/evoprune")

    spec = ModelSpec.from_config(model.config)
    half = LayerConfig(num_kv_heads=spec.num_kv_heads // 2, q_per_kv=spec.q_per_kv,
                       mlp_channels=spec.intermediate_size // 2, sparsity=0.25)
    candidate = Candidate(layers=(half,) * spec.num_layers)

    with pruner.applied(candidate):                 # in place, no weight copy
        logits = model(calib[:2]).logits
    pruner.importance.block_influence               # ShortGPT 1 - cos per block

    small = pruner.materialize(candidate)           # new nn.Module, same logits
    pruner.export(candidate, "qwen3-half", tokenizer=AutoTokenizer.from_pretrained("Qwen/Qwen3-0.6B"))
    again = load_pruned("qwen3-half")               # fresh process: same logits again

``pruner.set_mode("probe", ProbeSettings(...))`` (``evoprune.space.ProbeSettings``) applies a candidate's
widths per batch instead, the kept heads and channels chosen by Probe Pruning (``_probe.py``); its
export holds the dense weights and ``load_pruned`` gives back a model that prunes per batch.
Each mode is one strategy behind one interface (``_strategy.py``): the pruner owns a candidate's
structure (dropped blocks and sublayers, KV-cache indices, head counts) and hands the pruned
sublayers to ``StaticStrategy`` (``_static.py``: prefix views + Wanda masks) or ``ProbeStrategy``
(``_probe.py``); ``pruner.strategy`` is the current one.

Compressed levels with reconstruction: ``pruner.use_levels(levels_from_space(space), cache_dir=...)``
takes the static mode's kept slices from a :class:`LevelDB` built once -- SparseGPT (or Wanda /
magnitude) sparsity levels and OBS-compensated ``o_proj`` / ``down_proj`` widths (``_obs.py``,
``_levels.py``); apply, revert, materialize, every export and fine-tuning use the stored weights.

A new architecture needs one call, :func:`register_adapter` (module names plus the bias
facts the cost model needs; see :class:`ArchAdapter`).

Exports load through plain transformers too. An export that stock transformers builds exactly
(no dropped sublayer and one set of widths for every kept block: the dense ones, or any the dense
config class accepts) keeps the dense ``model_type``; any other gets
``model_type="evoprune_<dense>"``, which transformers without evoprune rejects loudly. In a
process that imported evoprune, transformers resolves those types to evoprune's classes, which
follow ``per_layer_config`` (a post-import hook, see :mod:`evoprune._transformers_hook`;
:func:`register_auto_classes` registers them eagerly)::

    import evoprune
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("qwen3-half")   # same logits as load_pruned

:func:`per_layer_modules` is the scoped patch (it always restores the original classes) those
classes use; ``from_pretrained`` inside it also loads format-1 exports (written before the
``evoprune_<dense>`` types: dense ``model_type`` + ``per_layer_config``), as ``load_pruned`` does::

    with per_layer_modules():
        model = AutoModelForCausalLM.from_pretrained("qwen3-half")

Serving formats: ``pruner.export(candidate, "out", tokenizer=tok, format="gguf", dtype="f16")`` adds
``model-f16.gguf`` (llama.cpp; :func:`write_gguf`) to the HF folder, ``format="nemotron-nas"`` writes
DeciLM ``block_configs`` for vLLM (:func:`write_nemotron_nas`); :func:`verify_export` runs a prompt
through evoprune's model and the target engine (``evoprune verify-export``). A candidate a format
cannot hold exactly raises :class:`ExportFormatError` before anything is written;
:func:`check_format_args` checks a format name and dtype before a model is loaded, and
:func:`verify_report` is the ``evoprune verify-export`` verb (printable lines and a verdict).

:func:`calibration_pass` is the one calibration forward pass with hooks (the probe mode's history,
FLAP's and OWL's statistics): calibration tokens through the decoder backbone, each hooked
module's input handed to a function, the hooks removed afterwards.

Inside the room, module-level imports flow one way (each module imports only those above it)::

    _calib, _adapters, _leveldb < _modules < _auto < _masks, _importance, _gguf < _obs, _nemotron < _serve
      (formats) < _strategy (interface) < _static, _probe (strategies) < _levels < _export < _pruner
      < _load < _verify

``evoprune.space`` is reached through its public ``__init__`` only. The only deferred imports are of
third-party packages (transformers, safetensors, gguf, llama_cpp, accelerate, vllm): importing
``evoprune.pruning`` loads torch but not transformers.
"""

from ._adapters import ArchAdapter, get_adapter, register_adapter, registered_model_types
from ._auto import register_auto_classes
from ._calib import calibration_pass
from ._gguf import ExportFormatError, write_gguf
from ._importance import IMPORTANCE_METHODS, Importance
from ._leveldb import LevelDB, LevelDBError
from ._levels import LevelSettings, levels_from_space
from ._load import load_pruned
from ._masks import wanda_mask
from ._modules import DroppedAttention, DroppedMLP, per_layer_modules
from ._nemotron import write_nemotron_nas
from ._pruner import Pruner
from ._serve import EXPORT_FORMAT_VERSION  # noqa: F401  (importable; written into exported configs)
from ._serve import EXPORT_FORMATS, check_format_args
from ._verify import VerifyResult, verify_export, verify_report

__all__ = [
    "EXPORT_FORMATS",
    "IMPORTANCE_METHODS",
    "ArchAdapter",
    "DroppedAttention",
    "DroppedMLP",
    "ExportFormatError",
    "Importance",
    "LevelDB",
    "LevelDBError",
    "LevelSettings",
    "Pruner",
    "VerifyResult",
    "calibration_pass",
    "check_format_args",
    "get_adapter",
    "levels_from_space",
    "load_pruned",
    "per_layer_modules",
    "register_adapter",
    "register_auto_classes",
    "registered_model_types",
    "verify_export",
    "verify_report",
    "wanda_mask",
    "write_gguf",
    "write_nemotron_nas",
]
