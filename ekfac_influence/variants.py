"""Named ways of computing influence, scored side by side by the evaluation.

A variant is a name and a (FactorConfig, ScoreConfig) pair: "ekfac" is the default EK-FAC, and
"ekfac, 3 refinement steps" or "kfac, damping 1e-3" is just another entry. Any field of either
config may be set, so a field added to them later needs no change here.

    variant("kfac")                                    # strategy kfac, every other field default
    variant("ekfac", name="ekfac+3", refine_steps=3)   # a ScoreConfig field; FactorConfig fields likewise
    variants_from_config(["identity", {"name": "ekfac+3", "strategy": "ekfac", "refine_steps": 3}])

Shapes: Q queries, N training sequences.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import ConfigError, FactorConfig, ScoreConfig, check_variant_entries
from .fit import fit_factors
from .influence import compute_scores
from .model import select_layers
from .objectives import Objective

DEFAULT_SCORE = ScoreConfig(per_layer=False)  # the evaluation needs only the total score


@dataclass(frozen=True)
class Variant:
    """A named (FactorConfig, ScoreConfig) pair: one column of the evaluation's table."""

    name: str
    factors: FactorConfig = FactorConfig()
    score: ScoreConfig = DEFAULT_SCORE


def variant(strategy: str, *, name: str | None = None, base: FactorConfig = FactorConfig(),
            base_score: ScoreConfig = DEFAULT_SCORE, **fields) -> Variant:
    """A Variant of `strategy`; each keyword sets the FactorConfig or ScoreConfig field of that name (or both)."""
    factor_names = {f.name for f in dataclasses.fields(FactorConfig)}
    score_names = {f.name for f in dataclasses.fields(ScoreConfig)}
    unknown = sorted(set(fields) - factor_names - score_names - {"strategy"})
    if unknown:
        raise ConfigError(f"variant {name or strategy}: unknown field(s) {', '.join(unknown)}; fields of FactorConfig "
                          f"and ScoreConfig are allowed")
    factors = dataclasses.replace(base, strategy=strategy, **{k: v for k, v in fields.items() if k in factor_names})
    score = dataclasses.replace(base_score, **{k: v for k, v in fields.items() if k in score_names})
    return Variant(name or strategy, factors, score)


def variants_from_config(entries: Sequence, base: FactorConfig = FactorConfig(), *,
                         base_score: ScoreConfig = DEFAULT_SCORE, field: str = "evaluate.variants") -> list[Variant]:
    """Variants from config entries: a strategy name, or a mapping {name, strategy, field: value, ...}.

    A mapping without a strategy keeps the base's; `base` (the run's factors section) supplies every
    field an entry does not set.
    """
    found = []
    for entry in check_variant_entries(entries, field):
        if isinstance(entry, str):
            found.append(variant(entry, base=base, base_score=base_score))
        else:
            fields = {k: v for k, v in entry.items() if k not in ("name", "strategy")}
            found.append(variant(entry.get("strategy", base.strategy), name=entry["name"], base=base,
                                 base_score=base_score, **fields))
    return found


def score_variants(model: nn.Module, train_batches: Iterable, query_batches: Iterable, objective: Objective,
                   variants: Sequence[Variant], *, show_progress: bool = True) -> tuple[dict[str, Tensor], dict[str, str]]:
    """({name: scores_QN}, {name: why it was skipped}): fit each variant's curvature and score every pair.

    A variant that cannot run on this model (exact influence of too many parameters) is skipped with
    its reason instead of failing the evaluation.
    """
    scores, skipped = {}, {}
    for v in variants:
        size = sum(layer.num_params for layer in select_layers(model, v.factors.layers))
        if v.factors.strategy == "exact" and size > v.factors.max_exact_params:
            skipped[v.name] = (f"exact influence builds a {size} x {size} Gauss-Newton, more than "
                               f"max_exact_params={v.factors.max_exact_params}")
            continue
        factors = fit_factors(model, train_batches, objective, v.factors, show_progress=show_progress)
        result = compute_scores(model, factors, query_batches, train_batches, objective, v.score,
                                show_progress=show_progress)
        scores[v.name] = result.scores.detach().to("cpu", torch.float64)
    return scores, skipped
