"""Levels <-> candidates: the gene-level view of a :class:`~evoprune.space.SearchSpace`.

A mixin of ``SearchSpace``: turning level vectors into canonical candidates and back,
validating candidates against the space, and the Optuna view (params are level indices).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._candidate import ATTN_LINEARS, LINEAR_NAMES, MLP_LINEARS, Candidate, LayerConfig

_DROPPED = LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0)


class LevelsMixin:
    """Level vectors, candidates and Optuna params of a ``SearchSpace`` (uses its ``spec``,
    ``genes``, ``_layer_genes``, ``_gene_index``, ``_dense_layer``, ``attention``,
    ``sparsity_levels``, ``pattern_2_4``, ``mlp_step`` and ``budget``)."""

    def _check_levels(self, levels: Mapping[str, Any], *, strict_missing: bool, ignore_unknown: bool) -> list[int]:
        if not isinstance(levels, Mapping):
            raise TypeError(f"levels must be a mapping gene name -> level index, got {type(levels).__name__}.")
        out = [0] * len(self.genes)
        for name, value in levels.items():
            k = self._gene_index.get(name)
            if k is None:
                if ignore_unknown:
                    continue
                raise ValueError(f"unknown gene {name!r}; genes are named like {self.genes[0].name!r} (see space.genes).")
            if isinstance(value, (float, np.floating)) and float(value).is_integer():
                value = int(value)
            if isinstance(value, np.integer):
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.genes[k].top:
                raise ValueError(f"gene {name!r} takes a level index in 0..{self.genes[k].top}, got {value!r}.")
            out[k] = value
        if strict_missing:
            missing = [g.name for g in self.genes if g.name not in levels]
            if missing:
                raise ValueError(f"levels are missing genes {missing[:5]}{' ...' if len(missing) > 5 else ''}.")
        return out

    def _layer_from(self, i: int, lv: Sequence[int]) -> LayerConfig:
        """Canonical LayerConfig of block ``i`` for the level vector ``lv``."""
        g = self._layer_genes[i]
        if not g:
            return self._dense_layer
        if "block" in g:
            b = self.genes[g["block"]].levels[lv[g["block"]]]
            if b == 0:
                return _DROPPED
            if b < 0:
                return LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0, block_linear=-b)
        spec = self.spec
        nkv, m = spec.num_kv_heads, spec.q_per_kv
        attn_linear = mlp_linear = 0
        if "attn" in g:
            u = self.genes[g["attn"]].levels[lv[g["attn"]]]
            if u <= 0:
                nkv = m = 0
                attn_linear = -u
            elif self.attention == "kv_groups":
                nkv = u
            elif self.attention == "q_per_group":
                m = u
        channels = spec.intermediate_size
        if "mlp" in g:
            channels = self.genes[g["mlp"]].levels[lv[g["mlp"]]]
            if channels < 0:
                channels, mlp_linear = 0, -channels
        if nkv == 0 and channels == 0 and not (attn_linear or mlp_linear):
            return _DROPPED
        sparsity = 0.0
        linear: list[tuple[str, float]] = []
        if "sparsity" in g:
            sparsity = self.genes[g["sparsity"]].levels[lv[g["sparsity"]]]
        else:
            for name in LINEAR_NAMES:
                k = g.get(f"{name}.sparsity")
                if k is None or lv[k] == 0:
                    continue
                if (name in ATTN_LINEARS and nkv == 0) or (name in MLP_LINEARS and channels == 0):
                    continue
                linear.append((name, self.genes[k].levels[lv[k]]))
        return LayerConfig(
            num_kv_heads=nkv, q_per_kv=m, mlp_channels=channels, sparsity=sparsity, linear_sparsity=tuple(linear),
            attn_linear=attn_linear, mlp_linear=mlp_linear,
        )

    def _candidate(self, lv: Sequence[int]) -> Candidate:
        layers = tuple(self._layer_from(i, lv) for i in range(self.spec.num_layers))
        if all(layer.dropped for layer in layers):
            raise ValueError(
                "these levels drop every block; keep at least one (e.g. frozen_layers=(0,) keeps the first)."
            )
        return Candidate(layers=layers, sparsity_pattern="2:4" if self.pattern_2_4 else "unstructured")

    def candidate_from_levels(self, levels: Mapping[str, int]) -> Candidate:
        """The candidate for ``{gene name: level index}``; missing genes are at level 0 (dense).

        Genes that cannot matter (the widths and sparsities of a dropped block, the
        sparsity of a dropped sublayer's linears) are ignored, and the candidate is
        canonical: ``candidate_from_levels(levels_of(c)) == canonical(c)``.
        Raises ``ValueError`` for unknown names, out-of-range levels, or levels that
        drop every block.
        """
        return self._candidate(self._check_levels(levels, strict_missing=False, ignore_unknown=False))


    def _linear_level(self, g: Any, part: str, rank: int, where: str) -> int:
        """The index of the ``linear`` level of rank ``rank`` in block genes ``g``'s ``part`` gene (one line if absent)."""
        values = self.genes[g[part]].levels if part in g else ()
        if -rank not in values:
            option = "drop_attention" if part == "attn" else "drop_mlp"
            raise ValueError(f"{where}: {part}_linear={rank} is not a level of this space (linear_ranks with "
                             f"{option}=True offers it).")
        return values.index(-rank)

    def _layer_levels(self, i: int, layer: LayerConfig) -> dict[str, int]:
        g = self._layer_genes[i]
        out = {kind: 0 for kind in g}
        spec = self.spec
        where = f"layer {i}"
        if not g:
            dense = self._dense_layer
            if (
                (layer.num_kv_heads, layer.q_per_kv, layer.mlp_channels)
                != (dense.num_kv_heads, dense.q_per_kv, dense.mlp_channels)
                or any(layer.sparsity_of(n) for n in LINEAR_NAMES)
            ):
                raise ValueError(f"{where} is frozen (frozen_layers) and must stay dense; got {layer}.")
            return out
        if layer.dropped and "block" in g:
            out["block"] = self.genes[g["block"]].top
            return out
        if layer.block_linear:
            values = self.genes[g["block"]].levels if "block" in g else ()
            if -layer.block_linear not in values:
                raise ValueError(f"{where}: block_linear={layer.block_linear} is not a level of this space (block "
                                 f"levels {values}; linear_ranks with drop_blocks=True offers it).")
            out["block"] = values.index(-layer.block_linear)
            return out
        # attention
        if layer.attn_linear:
            out["attn"] = self._linear_level(g, "attn", layer.attn_linear, where)
        elif layer.attn_dropped:
            if "attn" not in g or not self.genes[g["attn"]].drops:
                what = "drop_blocks=True" if layer.dropped else "drop_attention=True"
                raise ValueError(f"{where} drops attention but this space does not ({what} allows it).")
            out["attn"] = self.genes[g["attn"]].top
        else:
            if self.attention == "kv_groups":
                if layer.q_per_kv != spec.q_per_kv:
                    raise ValueError(
                        f"{where}: attention='kv_groups' keeps every query head of a kept group "
                        f"(q_per_kv={spec.q_per_kv}); got q_per_kv={layer.q_per_kv}."
                    )
                unit = layer.num_kv_heads
            elif self.attention == "q_per_group":
                if layer.num_kv_heads != spec.num_kv_heads:
                    raise ValueError(
                        f"{where}: attention='q_per_group' keeps all {spec.num_kv_heads} KV groups; "
                        f"got num_kv_heads={layer.num_kv_heads}."
                    )
                unit = layer.q_per_kv
            else:
                if (layer.num_kv_heads, layer.q_per_kv) != (spec.num_kv_heads, spec.q_per_kv):
                    raise ValueError(
                        f"{where}: attention width is not searched (attention=None) but the layer keeps "
                        f"{layer.num_kv_heads} KV heads x {layer.q_per_kv} query heads."
                    )
                unit = spec.num_kv_heads
            if "attn" in g:
                values = self.genes[g["attn"]].levels
                if unit not in values:
                    raise ValueError(f"{where}: {unit} attention units is not a level of this space {values}.")
                out["attn"] = values.index(unit)
        # mlp
        if layer.mlp_linear:
            out["mlp"] = self._linear_level(g, "mlp", layer.mlp_linear, where)
        elif layer.mlp_dropped and ("mlp" not in g or not self.genes[g["mlp"]].drops):
            what = "drop_blocks=True" if layer.dropped else "drop_mlp=True"
            raise ValueError(f"{where} drops the MLP but this space does not ({what} allows it).")
        elif "mlp" in g:
            values = self.genes[g["mlp"]].levels
            if layer.mlp_channels not in values:
                raise ValueError(
                    f"{where}: mlp_channels={layer.mlp_channels} is not a level of this space "
                    f"({_short(values)}); use multiples of mlp_step={self.mlp_step}."
                )
            out["mlp"] = values.index(layer.mlp_channels)
        elif layer.mlp_channels != spec.intermediate_size:
            raise ValueError(
                f"{where}: mlp_channels={layer.mlp_channels} but this space keeps the MLP dense "
                f"({spec.intermediate_size})."
            )
        # sparsity of the linears that exist
        live = [n for n in ATTN_LINEARS if not layer.attn_dropped] + [n for n in MLP_LINEARS if not layer.mlp_dropped]
        levels = self.sparsity_levels or (0.0,)
        if "sparsity" in g or not any(f"{n}.sparsity" in g for n in LINEAR_NAMES):
            values = {layer.sparsity_of(n) for n in live}
            if len(values) > 1:
                raise ValueError(
                    f"{where} has different sparsities per linear {dict((n, layer.sparsity_of(n)) for n in live)}; "
                    "that needs sparsity_granularity='linear'."
                )
            s = values.pop() if values else 0.0
            k = _level_index(s, levels)
            if k is None:
                raise ValueError(f"{where}: sparsity {s} is not a level of this space {levels}.")
            if "sparsity" in g:
                out["sparsity"] = k
        else:
            for n in live:
                s = layer.sparsity_of(n)
                k = _level_index(s, levels)
                if k is None:
                    raise ValueError(f"{where}: sparsity {s} of linear {n!r} is not a level of this space {levels}.")
                out[f"{n}.sparsity"] = k
        return out

    def levels_of(self, candidate: Candidate) -> dict[str, int]:
        """``{gene name: level index}`` of ``candidate`` (validates it first; see :meth:`validate`).

        Genes that cannot matter (a dropped block's widths, a dropped sublayer's
        sparsities) are reported at level 0.
        """
        if not isinstance(candidate, Candidate):
            raise TypeError(f"expected a Candidate, got {type(candidate).__name__}.")
        if candidate.num_layers != self.spec.num_layers:
            raise ValueError(
                f"candidate has {candidate.num_layers} layers but the model has {self.spec.num_layers}."
            )
        if candidate.has_sparsity:
            want = "2:4" if self.pattern_2_4 else "unstructured"
            if candidate.sparsity_pattern != want:
                raise ValueError(
                    f"candidate uses sparsity_pattern={candidate.sparsity_pattern!r} but this space uses {want!r}."
                )
        out: dict[str, int] = {}
        for i, layer in enumerate(candidate.layers):
            for kind, level in self._layer_levels(i, layer).items():
                out[f"L{i}.{kind}"] = level
        return {g.name: out[g.name] for g in self.genes}

    def validate(self, candidate: Candidate) -> None:
        """Raise ``ValueError`` (saying what is wrong) unless ``candidate`` is in this space."""
        self.levels_of(candidate)

    def contains(self, candidate: Candidate) -> bool:
        """Whether ``candidate`` is in this space (budget not considered)."""
        try:
            self.levels_of(candidate)
        except ValueError:
            return False
        return True

    def canonical(self, candidate: Candidate) -> Candidate:
        """The canonical form of a candidate of this space (irrelevant fields of dropped parts cleared)."""
        return self.candidate_from_levels(self.levels_of(candidate))

    def dense(self) -> Candidate:
        """The candidate with every gene at level 0."""
        return self._candidate([0] * len(self.genes))


    # ------------------------------------------------------------------ Optuna

    def optuna_distributions(self, *, categorical: bool = False) -> dict[str, Any]:
        """``{gene name: IntDistribution(0, top)}`` over level indices (``CategoricalDistribution`` of
        the indices with ``categorical=True``; use the same choice in :meth:`suggest`).

        >>> from evoprune.space import ModelSpec, SearchSpace
        >>> spec = ModelSpec.from_config(dict(model_type="llama", num_hidden_layers=2, hidden_size=64,
        ...     num_attention_heads=8, num_key_value_heads=4, intermediate_size=128, vocab_size=97))
        >>> SearchSpace.from_model(spec, attention=None, mlp_step=64).optuna_distributions()
        {'L0.mlp': IntDistribution(high=1, log=False, low=0, step=1), 'L1.mlp': IntDistribution(high=1, log=False, low=0, step=1)}
        """
        from optuna.distributions import CategoricalDistribution, IntDistribution

        if categorical:
            return {g.name: CategoricalDistribution(tuple(range(g.top + 1))) for g in self.genes}
        return {g.name: IntDistribution(0, g.top) for g in self.genes}

    def params_of(self, candidate: Candidate) -> dict[str, int]:
        """Optuna params of ``candidate`` (its level indices), e.g. for ``study.enqueue_trial``."""
        return self.levels_of(candidate)

    def candidate_from_params(self, params: Mapping[str, Any]) -> Candidate:
        """The candidate of an Optuna trial's ``params``; keys that are not genes are ignored, every
        gene must be present."""
        return self._candidate(self._check_levels(params, strict_missing=True, ignore_unknown=True))

    def suggest(self, trial: Any, *, categorical: bool = False, set_constraints: bool = True) -> Candidate:
        """Suggest every gene on an Optuna ``trial`` and return the candidate.

        With a budget and ``set_constraints``, the :meth:`constraints` are set on the
        trial (``trial.set_constraint``) so constrained samplers see them. Raises
        ``ValueError`` if the suggested levels drop every block (freeze a layer to
        rule that out).

        >>> import optuna
        >>> from evoprune.space import ModelSpec, SearchSpace
        >>> spec = ModelSpec.from_config(dict(model_type="llama", num_hidden_layers=2, hidden_size=64,
        ...     num_attention_heads=8, num_key_value_heads=4, intermediate_size=128, vocab_size=97))
        >>> space = SearchSpace.from_model(spec, mlp_step=64)
        >>> study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        >>> trial = study.ask(space.optuna_distributions())
        >>> space.suggest(trial) == space.candidate_from_params(trial.params)
        True
        """
        params: dict[str, int] = {}
        for g in self.genes:
            if categorical:
                params[g.name] = trial.suggest_categorical(g.name, list(range(g.top + 1)))
            else:
                params[g.name] = trial.suggest_int(g.name, 0, g.top)
        candidate = self.candidate_from_params(params)
        if set_constraints and self.budget and hasattr(trial, "set_constraint"):
            for key, value in self.constraints(candidate).items():
                trial.set_constraint(key, value)
        return candidate


def _level_index(value: float, levels: Sequence[float]) -> int | None:
    for k, level in enumerate(levels):
        if math.isclose(value, level, rel_tol=0.0, abs_tol=1e-9):
            return k
    return None


def _short(values: Sequence[Any]) -> str:
    return str(tuple(values)) if len(values) <= 6 else f"({values[0]}, {values[1]}, ..., {values[-1]})"
