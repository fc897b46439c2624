"""The pruning mode of a search space: ``"static"`` (default) or ``"probe"`` (Probe Pruning, per batch).

``"static"``: a candidate keeps the *k most important* heads / KV groups / MLP channels of every
block, ranked once on calibration data; one fixed smaller model per candidate.

``"probe"``: a candidate's per-layer widths say *how many* units each block keeps, and which ones
are chosen **per batch** by Probe Pruning (Le, Diao, Wang et al., ICLR 2025, arXiv 2502.15618):
a small probe of the batch picked by residual importance runs through the block, its states are
integrated with historical states, and the PP importance score ranks the units (see
:mod:`evoprune.pruning._probe`). The cost model counts what runs per batch (the active widths);
the model in memory stays dense. Sparsity genes do not combine with the probe mode.

This module is pure data (no torch): :class:`ProbeSettings` is stored with the space (and so
with the study) as a JSON dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .._validate import check_keys

__all__ = ["LEVEL_METHODS", "PRUNING_MODES", "ProbeCalibration", "ProbeSettings", "check_level_methods",
           "resolve_mode"]

PRUNING_MODES: tuple[str, ...] = ("static", "probe")
GQA_MODES: tuple[str, ...] = ("groups", "reference")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeCalibration:
    """The probe mode's own calibration set for the history (``probe: {calibration: {...}}``).

    Without it the history comes from the study's importance calibration tokens
    (``calibration: {num_sequences, seq_len}``). The defaults are sized for two CPU cores (64 x 256
    tokens, one dense pass); the paper's setting is 2,000 samples (``num_sequences: 2000``), for a GPU.
    The windows are drawn from the calibration split with the study's seed (stage ``"probe_calibration"``),
    so the set is fingerprinted by the data, the seed and these settings (stored with the space).

    Args:
        num_sequences: calibration sequences.
        seq_len: tokens per sequence (the history covers positions ``0 .. seq_len - 1``; later
            positions start from zero, as the reference's buffer).
    """

    num_sequences: int = 64
    seq_len: int = 256

    def __post_init__(self) -> None:
        for name in ("num_sequences", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ProbeSettings.calibration.{name} must be a positive integer, e.g. 64; got {v!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "ProbeCalibration":
        if isinstance(data, ProbeCalibration):
            return data
        if data is not None and not isinstance(data, Mapping):
            raise ValueError(f"ProbeSettings.calibration must be a mapping such as {{num_sequences: 64, seq_len: 256}}, "
                             f"got {data!r}.")
        data = dict(data or {})
        check_keys("probe calibration", data, (f.name for f in dataclasses.fields(cls)))
        return cls(**data)


#: the level-database options of a space and their values (``None``: no level database for that part)
LEVEL_METHODS: dict[str, tuple[str, ...]] = {"sparsity_method": ("sparsegpt", "wanda", "magnitude"),
                                             "width_method": ("obs", "slice"),
                                             "level_dtype": ("float32", "float16", "bfloat16"),
                                             "level_inputs": ("dense", "sequential")}


def check_level_methods(sparsity_method: Any, width_method: Any, level_dtype: Any, *, mode: str,
                        level_inputs: Any = "dense") -> None:
    """One-line ``ValueError`` for a space's level-database options that cannot work together."""
    for name, value in (("sparsity_method", sparsity_method), ("width_method", width_method),
                        ("level_dtype", level_dtype), ("level_inputs", level_inputs)):
        if value is not None and value not in LEVEL_METHODS[name]:
            raise ValueError(f"SearchSpace.{name} must be one of {LEVEL_METHODS[name]}, got {value!r}.")
    if (sparsity_method is not None or width_method is not None) and mode != "static":
        raise ValueError(f"SearchSpace: sparsity_method / width_method need mode 'static', got {mode!r}; "
                         "remove them or the mode.")
    if level_inputs == "sequential" and (sparsity_method != "sparsegpt" or width_method == "obs"):
        raise ValueError(f"SearchSpace: level_inputs 'sequential' needs sparsity_method 'sparsegpt' and no width_method "
                         f"obs (not supported with sequential inputs), got sparsity_method {sparsity_method!r}, "
                         f"width_method {width_method!r}; set level_inputs: dense or sparsity_method: sparsegpt.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeSettings:
    """Probe Pruning settings (defaults follow the reference code Qi-Le1/Probe_Pruning).

    Args:
        seq_ratio: share of the sequence positions in the probe, ranked by the L2 norm (over the
            batch) of the residual's per-token norm; at least 2 positions, and when 10 or fewer
            are kept the first position is always one of them (reference: ``seqrank`` 0.5).
        batch_ratio: share of the sequences in the probe (at least one), ranked the same way over
            the chosen positions (reference: ``bszrank`` 0.05).
        momentum: exponential moving average of the history after each prefill batch
            (reference ``ema`` 0.99); ``1.0`` keeps the calibration history fixed.
        history: integrate the probe's states with the history (calibration + earlier batches of
            this applied session); ``False`` scores channels on the probe alone.
        gqa: how attention is pruned under grouped-query attention. ``"groups"`` (default): KV
            groups score the sum of their query heads, the best groups are kept and the best
            ``q_per_kv`` query heads inside each, so K/V and the KV cache shrink. ``"reference"``: as
            the reference code, K/V stay whole and the ``num_kv_heads * q_per_kv`` best query heads
            are kept anywhere (a candidate's attention width is then its number of query heads).
        use_probe: ``False`` scores units from the history alone (no probe is run: the "calibration
            only" ablation of the paper); needs ``history``.
        calibration: :class:`ProbeCalibration` (or its dict): the history's own calibration set;
            ``None`` (default): the study's importance calibration tokens.

    Example::

        >>> ProbeSettings(seq_ratio=0.25).to_dict()
        {'seq_ratio': 0.25, 'batch_ratio': 0.05, 'momentum': 0.99, 'history': True}
    """

    seq_ratio: float = 0.5
    batch_ratio: float = 0.05
    momentum: float = 0.99
    history: bool = True
    gqa: str = "groups"
    use_probe: bool = True
    calibration: ProbeCalibration | None = None

    def __post_init__(self) -> None:
        if self.calibration is not None:
            object.__setattr__(self, "calibration", ProbeCalibration.from_dict(self.calibration))
        for name in ("seq_ratio", "batch_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < float(v) <= 1:
                raise ValueError(f"ProbeSettings.{name} must be a share in (0, 1], e.g. 0.5; got {v!r}.")
            object.__setattr__(self, name, float(v))
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= float(m) <= 1:
            raise ValueError(f"ProbeSettings.momentum must be in [0, 1] (1.0 freezes the history), got {m!r}.")
        object.__setattr__(self, "momentum", float(m))
        if not isinstance(self.history, bool):
            raise ValueError(f"ProbeSettings.history must be true or false, got {self.history!r}.")
        if not isinstance(self.use_probe, bool) or (not self.use_probe and not self.history):
            raise ValueError(f"ProbeSettings.use_probe must be true or false, and false needs history: true (the units "
                             f"are then scored from the history alone); got use_probe={self.use_probe!r}, "
                             f"history={self.history!r}.")
        if self.gqa not in GQA_MODES:
            raise ValueError(f"ProbeSettings.gqa must be one of {GQA_MODES} (groups: shrink K/V; reference: K/V whole, "
                             f"query heads anywhere), got {self.gqa!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a dict; defaults added after the first release are left out (so a space
        stored before them keeps its JSON and key)."""
        out = dataclasses.asdict(self)
        if out["gqa"] == "groups":
            del out["gqa"]
        if out["use_probe"]:
            del out["use_probe"]
        if out["calibration"] is None:
            del out["calibration"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "ProbeSettings":
        data = dict(data or {})
        check_keys("probe settings", data, (f.name for f in dataclasses.fields(cls)))
        return cls(**data)


def resolve_mode(mode: Any, probe: Any, *, sparsity: bool) -> ProbeSettings | None:
    """Validate a space's ``mode`` and ``probe`` options; the settings (``None`` in static mode)."""
    if mode not in PRUNING_MODES:
        raise ValueError(f"SearchSpace.mode must be one of {PRUNING_MODES}, got {mode!r}.")
    if mode == "static":
        if probe is not None:
            raise ValueError("SearchSpace.probe is only used with mode='probe'; remove it or set mode: probe.")
        return None
    if sparsity:
        raise ValueError("SearchSpace(mode='probe') prunes heads and channels per batch and has no sparsity masks; "
                         "remove sparsity_levels / pattern_2_4 or use mode='static'.")
    if isinstance(probe, ProbeSettings):
        return probe
    if probe is not None and not isinstance(probe, Mapping):
        raise ValueError(f"SearchSpace.probe must be a mapping such as {{seq_ratio: 0.5}}, got {probe!r}.")
    return ProbeSettings.from_dict(probe)
