"""`build_runtime`: a :class:`StudyConfig` turned into live objects (model, data, pruner, space, pipeline).

::

    from evoprune.search import StudyConfig, build_runtime
    runtime = build_runtime(StudyConfig.from_yaml("studies/reference_small.yaml"))
    runtime.fingerprints        # {"model": ..., "data": ..., "space": ..., "config": ...}
    study = runtime.create_study()                # in memory; or storage=..., study_name=...
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

from .._logging import get_logger
from ..space import LatencyTable, SearchSpace
from ._config import StudyConfig
from .._device import check_device, check_dtype, torch_dtype
from ._evolution import EvolutionarySampler
from ._sweep import BudgetSweep
from ._objectives import objective_directions
from ._stages import build_pipeline, load_object

__all__ = ["Runtime", "build_pipeline", "build_runtime", "make_sampler", "resolve_model_path", "space_from_config",
           "study_sampler"]

_log = get_logger("search.runtime")


@dataclasses.dataclass
class Runtime:
    """Everything a search needs in memory. Build it with :func:`build_runtime`, or by hand in tests.

    Attributes:
        model: the dense causal LM (permuted in place by the pruner; function unchanged).
        space: the :class:`~evoprune.space.SearchSpace` (with the config's budgets).
        pipeline: the :class:`~evoprune.evaluators.Pipeline` of the stage schedule.
        context: the :class:`~evoprune.evaluators.EvalContext` (eval/train tokens, pruner, cost model).
        objectives: told objective names (``["kl"]``, ``["kl", "params"]``, ...).
        pruner: the :class:`~evoprune.pruning.Pruner`.
        tokenizer: the tokenizer (may be ``None`` for hand-built runtimes).
        calib_ids: the calibration tokens ``[n, seq_len]``.
        config: the :class:`StudyConfig` (``None`` for hand-built runtimes).
        fingerprints: ``{"model", "data", "space", "config"}`` digests for the study database
            (plus ``"data_files"``, the sha256 of a ``"text"`` source's files).
        fingerprint_details: what a fingerprint stands for, stored next to it (``"data_files"``:
            the resolved file list per split).
        model_path: where the model was loaded from.
    """

    model: Any
    space: SearchSpace
    pipeline: Any
    context: Any
    objectives: Sequence[str] = ("kl",)
    pruner: Any = None
    tokenizer: Any = None
    calib_ids: Any = None
    config: StudyConfig | None = None
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)
    model_path: str | None = None
    fingerprint_details: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def directions(self) -> list[str]:
        """Study directions for :attr:`objectives`."""
        return objective_directions(self.objectives, self.pipeline, self.space)

    @property
    def seed(self) -> int:
        return int(getattr(self.context, "seed", 0) or 0)

    def create_study(self, storage: Any = None, study_name: str | None = None, *, load_if_exists: bool = False,
                     sampler: Any = None) -> Any:
        """An :class:`optuna.Study` with the right directions and, unless given, the config's
        :func:`study_sampler` (the same sampler :func:`evoprune.create_study` gives a study).
        """
        import optuna

        if sampler is None and self.config is not None:
            sampler = study_sampler(self.config)
        return optuna.create_study(
            storage=storage, study_name=study_name, directions=self.directions, sampler=sampler,
            load_if_exists=load_if_exists,
        )

    def make_sampler(self) -> tuple[Any, str | None]:
        """``(sampler, budget_mode)`` of the config (for :class:`Searcher`)."""
        if self.config is None:
            raise ValueError("Runtime.make_sampler: this runtime has no config; build the sampler yourself.")
        return make_sampler(self.config.sampler.name, self.config.sampler.options, seed=self.seed, space=self.space)


# --------------------------------------------------------------------------- samplers


def make_sampler(
    name: str, options: Mapping[str, Any] | None = None, *, seed: int = 0, space: SearchSpace | None = None
) -> tuple[Any, str | None]:
    """Build a sampler by config name; returns ``(sampler, budget_mode)``.

    ``"evolutionary"`` gives an :class:`EvolutionarySampler` (or, with option
    ``budget_sweep: [ratios]``, a :class:`BudgetSweep` over the first budget's
    metric of ``space`` or ``sweep_metric``); ``"tpe"``, ``"nsgaii"``,
    ``"random"``, ``"gp"``, ``"qmc"`` give Optuna samplers; ``"pkg.mod:Class"``
    is imported and called with ``options`` (plus ``seed`` if it takes one).
    ``options["budget_mode"]`` is removed and returned for the Searcher.

    >>> s, mode = make_sampler("tpe", {"n_startup_trials": 5, "budget_mode": "repair"}, seed=3)
    >>> type(s).__name__, mode
    ('TPESampler', 'repair')
    """
    import inspect

    import optuna

    opts = dict(options or {})
    budget_mode = opts.pop("budget_mode", None)
    opts.setdefault("seed", seed)
    if name == "evolutionary":
        sweep = opts.pop("budget_sweep", None)
        metric = opts.pop("sweep_metric", None)
        if "init" in opts and isinstance(opts["init"], (list, dict)) :
            from ..space import Candidate

            init = opts["init"]
            opts["init"] = [Candidate.from_dict(c) for c in init] if isinstance(init, list) else Candidate.from_dict(init)
        if sweep is not None:
            if metric is None:
                metric = space.budget[0].metric if space is not None and space.budget else "params"
            return BudgetSweep(levels=sweep, metric=metric, **opts), budget_mode
        return EvolutionarySampler(**opts), budget_mode
    table = {
        "tpe": optuna.samplers.TPESampler,
        "nsgaii": optuna.samplers.NSGAIISampler,
        "random": optuna.samplers.RandomSampler,
        "gp": optuna.samplers.GPSampler,
        "qmc": optuna.samplers.QMCSampler,
    }
    if name in table:
        cls = table[name]
    else:
        cls = load_object(name)
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            params = {}
        if "seed" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            opts.pop("seed")
    try:
        return cls(**opts), budget_mode
    except TypeError as exc:
        raise ValueError(f"sampler {name!r}: bad options {sorted(opts)}: {exc}") from None


def study_sampler(config: StudyConfig) -> Any:
    """The Optuna study's own sampler -- the one rule for every way a study is made or opened: the
    config's Optuna sampler, or -- for generation samplers, whose trials get fixed params -- a
    ``RandomSampler(seed=config.seed)``, which never reads the trial history (Optuna's default
    TPE/NSGA-II would load every trial on each ask)."""
    import optuna

    built = make_sampler(config.sampler.name, config.sampler.options, seed=config.seed)[0]
    if isinstance(built, optuna.samplers.BaseSampler):
        return built
    return optuna.samplers.RandomSampler(seed=config.seed)


# --------------------------------------------------------------------------- pipeline


# --------------------------------------------------------------------------- model and data


def resolve_model_path(model: str, *, cache_dir: str | None = None) -> str:
    """``"reference:<size>"`` -> the built reference checkpoint folder (built once, offline afterwards)."""
    if model.startswith("reference:"):
        from ..data import build_reference_model

        return str(build_reference_model(model.partition(":")[2], cache_dir=cache_dir, progress=False))
    return model


def _digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def space_from_config(config: StudyConfig, model_config: Any) -> SearchSpace:
    """The study's :class:`~evoprune.space.SearchSpace`: ``config.space`` options and budgets on the
    model's config (a transformers config or its ``config.json`` dict; no weights needed)."""
    opts = dict(config.space)
    for key in ("attn_levels", "sparsity_levels", "frozen_layers", "linear_ranks"):
        if opts.get(key) is not None:
            opts[key] = tuple(opts[key])
    if opts.get("latency") is not None:
        opts["latency"] = LatencyTable.from_dict(opts["latency"])
    return SearchSpace.from_model(model_config, budget=config.budget, **opts)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__).strip("'\"")


def load_model_config(model: str, path: str) -> Any:
    """The transformers config of checkpoint ``path`` (of config string ``model``), with one clear
    error for a missing folder, a missing or corrupt ``config.json`` or an unknown model type."""
    from transformers import AutoConfig

    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"model {str(p)!r} is a file; give a checkpoint folder (with config.json), "
                             "'reference:tiny', 'reference:small' or a hub id.")
        cfg = p / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"model folder {p} has no config.json; give a transformers checkpoint folder "
                                    "(save_pretrained writes one).")
        try:
            json.loads(cfg.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"model folder {p}: config.json is not valid JSON ({_first_line(exc)}); restore it "
                             "from the original checkpoint.") from None
    elif p.is_absolute() or path.startswith((".", "~")) or path.endswith("/") or path.count("/") > 1:
        raise FileNotFoundError(f"model folder {p} does not exist; check `model` in the config (a checkpoint "
                                "folder, 'reference:tiny', 'reference:small' or a hub id such as 'org/name').")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        where = "" if p.exists() else f"there is no folder {p}, and as a hub id: "
        raise ValueError(f"cannot load model {model!r}: {where}{_first_line(exc)}") from None


def check_model_config(config: StudyConfig, model_config: Any) -> None:
    """What can be checked on the model's config alone, before any weight is loaded: a supported
    architecture, widths the space options divide, reachable budgets, sequence lengths within the
    model's positions."""
    max_pos = getattr(model_config, "max_position_embeddings", None)
    calib_len = config.calibration.seq_len
    for what, key, seq_len in ([("calibration", "calibration.seq_len", calib_len)]
                               + [(f"stage {s.name!r}", f"stages[{s.name!r}].seq_len", s.seq_len)
                                  for s in config.stages]):
        if max_pos is not None and seq_len > max_pos:
            raise ValueError(f"{what}: seq_len {seq_len} exceeds the model's max_position_embeddings={max_pos}; "
                             f"lower StudyConfig.{key} to at most {max_pos}.")
    space_from_config(config, model_config)


def check_splits(config: StudyConfig, splits: Mapping[str, Any], vocab: int | None) -> None:
    """The data fits the model and the config: token ids below ``vocab`` (the model's embedding rows:
    the tokenizer belongs to the model) and enough tokens for calibration, every stage's evaluation
    and fine-tuning."""
    for split, ids in splits.items():
        if ids.numel() and vocab is not None and int(ids.max()) >= vocab:
            raise ValueError(
                f"the tokenizer gives token id {int(ids.max())} in the {split} data, but the model's vocabulary has "
                f"{vocab} entries: tokenizer and model do not match; leave `tokenizer` unset (the model's own) or "
                "point it at the model's tokenizer."
            )
    need = [("calibration", "calibration", config.calibration.num_sequences * config.calibration.seq_len,
             config.calibration.seq_len, "calibration.num_sequences")]
    for s in config.stages:
        if s.eval_tokens:
            need.append((f"stage {s.name!r} evaluation", "validation", s.eval_tokens, s.seq_len,
                         f"stages[{s.name!r}].eval_tokens"))
        if s.finetune_tokens:
            need.append((f"stage {s.name!r} fine-tuning", "train", s.finetune_tokens, s.seq_len,
                         f"stages[{s.name!r}].finetune_tokens"))
    from ..evaluators import check_window_offsets

    for what, split, tokens, seq_len, key in need:
        have = splits[split].numel()
        pinned = {"validation": ("data", config.data.windows), "calibration": ("calibration",
                                                                               config.calibration.windows)}.get(split)
        if pinned is not None and isinstance(pinned[1], tuple):  # offsets: inside the data (count/overlap: config)
            try:
                check_window_offsets(pinned[1], seq_len, length=have)
            except ValueError as exc:
                raise ValueError(f"StudyConfig.{pinned[0]}.windows ({what}): {str(exc).partition(': ')[2]}") from None
        n = math.ceil(tokens / seq_len)
        if n > have // seq_len:
            raise ValueError(
                f"{what} needs {n} sequences of {seq_len} tokens, but the {split} data has only {have} tokens "
                f"({have // seq_len} sequences); add {split} text, or lower StudyConfig.{key} or the seq_len."
            )


def _probe_calibration(settings: Any, ids: Any, config: StudyConfig, fingerprint: str) -> dict[str, Any]:
    """``set_mode`` options of the probe mode's own calibration set (``probe: {calibration: {...}}``), if any."""
    pc = getattr(settings, "calibration", None)
    if pc is None:
        return {}
    from ..evaluators import make_token_set  # deferred as in build_runtime (loads torch)

    need = pc.num_sequences * pc.seq_len
    if ids.numel() < need:
        raise ValueError(f"space.probe.calibration needs {need} tokens ({pc.num_sequences} x {pc.seq_len}) but the "
                         f"calibration split has {ids.numel()}; lower num_sequences / seq_len or add data.")
    return {"calib_ids": make_token_set(ids, num_tokens=need, seq_len=pc.seq_len, stage="probe_calibration",
                                        seed=config.seed, data_fingerprint=fingerprint).ids}


def build_runtime(config: StudyConfig, *, model: Any = None, tokenizer: Any = None) -> Runtime:
    """Load the model, tokenizer and data of ``config`` and build pruner, space, pipeline and context.

    ``model``/``tokenizer`` may be passed to reuse objects already in memory
    (the model must be the dense, unpermuted model of ``config.model``).

    Fingerprints (``runtime.fingerprints``): ``model`` (weights sample digest of
    the dense model before permutation), ``data`` (calibration, validation and
    train token streams), ``space`` (:attr:`SearchSpace.key`) and ``config``; for a ``"text"`` data
    source also ``data_files`` (:func:`evoprune.data.text_files`: sha256 over the resolved files' names
    and bytes, the file list in ``runtime.fingerprint_details``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .._fingerprint import ids_fingerprint, model_fingerprint
    from .._paths import cache_folder
    from ..data import load_splits, text_files
    from ..evaluators import EvalContext, make_token_set
    from ..pruning import Pruner, levels_from_space

    if not isinstance(config, StudyConfig):
        raise TypeError(f"build_runtime needs a StudyConfig, got {type(config).__name__}.")
    from .._threads import apply_threads

    apply_threads(config.threads)  # $EVOPRUNE_THREADS (--threads), config.threads, or the CPUs free to us
    device = check_device(config.device)  # a device this machine has (one line otherwise), before anything loads
    path = resolve_model_path(config.model, cache_dir=config.cache_dir) if model is None else None
    # cheap checks first: the model's config.json, architecture, widths, budgets and sequence lengths
    model_config = model.config if model is not None else load_model_config(config.model, path)
    check_model_config(config, model_config)
    dtype = check_dtype(config.dtype, device, model_config)  # the device computes in it (one line otherwise)
    if model is None:
        _log.info("loading model", extra={"fields": {"model": path, "dtype": dtype, "device": device}})
        import transformers.utils.logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report would print many lines before our one
        try:
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype),
                                                               output_loading_info=True, ignore_mismatched_sizes=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"cannot load the weights of model {config.model!r} from {path}: {_first_line(exc)}; "
                             "check that the folder is a complete transformers checkpoint.") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        bad = [f"{k} has shape {list(ckpt)} in the weights, {list(want)} by config.json"
               for k, ckpt, want in sorted(info.get("mismatched_keys", []))[:1]] + \
            [f"{k} is missing from the weights" for k in sorted(info.get("missing_keys", []))[:1]]
        if bad:
            raise ValueError(f"the weights of model {config.model!r} in {path} do not match its config.json: {bad[0]}; "
                             "use the config.json saved with these weights.")
        # the fingerprint is taken on the CPU copy: the same weights give the same study on any device
        model_fp = model_fingerprint(model)
        model.to(device)
    else:
        model_fp = None
    model.eval()
    if tokenizer is None:
        tok_src = config.tokenizer or path
        if tok_src is None:
            raise ValueError("build_runtime: pass tokenizer= together with model= (or set config.tokenizer).")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_src)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot load the tokenizer {tok_src!r}: {_first_line(exc)}; set `tokenizer` in the "
                             "config to a tokenizer folder or hub id (default: the model's own).") from None
    files = text_files(config.data) if config.data.source == "text" else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(model.config, "vocab_size", None)
    splits = load_splits(config.data, tokenizer, cache_dir=config.cache_dir, vocab_size=vocab)
    check_splits(config, splits, vocab)
    calib_cfg = config.calibration
    fps = {k: ids_fingerprint(v) for k, v in splits.items()}
    data_fp = _digest(fps["calibration"], fps["validation"], fps["train"])
    calib = make_token_set(
        splits["calibration"], num_tokens=calib_cfg.num_sequences * calib_cfg.seq_len, seq_len=calib_cfg.seq_len,
        stage="calibration", seed=config.seed, data_fingerprint=fps["calibration"], windows=calib_cfg.windows,
    ).ids
    model_fp = model_fp or model_fingerprint(model)
    cache = config.cache_dir or None
    pruner = Pruner(
        model, calib, method=calib_cfg.method, cache_dir=cache_folder("importance", cache), model_fingerprint=model_fp,
        calib_batch_size=calib_cfg.batch_size,
    )
    space = space_from_config(config, model.config)
    if space.mode != "static":  # e.g. Probe Pruning: the evaluators apply candidates through the same pruner
        pruner.set_mode(space.mode, space.probe, **_probe_calibration(space.probe, splits["calibration"], config,
                                                                      fps["calibration"]))
    details: dict[str, dict[str, Any]] = {"data_files": files.to_dict()} if files else {}
    levels: dict[str, str] = {}
    if space.uses_levels:  # SparseGPT / OBS levels: built once (or found) in the cache, before any study row
        pruner.use_levels(levels_from_space(space), cache_dir=cache_folder("levels", cache), progress=True)
        info = pruner.levels or {}
        levels = {"levels": str(info.get("digest"))}
        details["levels"] = info
    pipeline = build_pipeline(config.stages)
    context = EvalContext(
        eval_ids=splits["validation"], train_ids=splits["train"], data_fingerprint=data_fp, seed=config.seed,
        device=device, pruner=pruner, cost_model=space.cost_model, tokenizer=tokenizer,
        batch_size=config.eval_batch_size, cache_dir=cache_folder("dense_reference", cache), model_fingerprint=model_fp,
        eval_windows=config.data.windows,
    )
    runtime = Runtime(
        model=model, space=space, pipeline=pipeline, context=context, objectives=list(config.objectives),
        pruner=pruner, tokenizer=tokenizer, calib_ids=calib, config=config,
        fingerprints={"model": model_fp, "data": data_fp, "space": space.key, "config": config.fingerprint,
                      **({"data_files": files.sha256} if files else {}), **levels},
        model_path=path, fingerprint_details=details,
    )
    runtime.directions  # validate objectives against the pipeline now
    _log.info("runtime ready", extra={"fields": {**runtime.fingerprints, "genes": len(space.genes)}})
    return runtime
