"""How close each strategy comes to exact influence (the damped Gauss-Newton built densely).

Correlation = mean over queries of the Pearson correlation, across training sequences, between a
strategy's scores and the exact ones. Every strategy uses the same per-layer damping rule
(λ_ℓ = 0.1 × mean of its own Λ_ℓ; exact and LiSSA: 0.1 × mean of G's diagonal for the layer).

Measured on this suite's models (2-core CPU, torch 2.13, float64), the thresholds sit below these:
    digits MLP (1,810 params, 1,000 train, 30 queries): ekfac 0.775  kfac 0.777  lissa 0.959  diagonal 0.393  identity 0.376
    tiny Llama (3,072 MLP params, 32 × 24 tokens, 4 queries): ekfac 0.650  kfac 0.645  lissa 0.820  diagonal 0.515  identity 0.464
The same models overtrained (digits at 99.7% train accuracy) gave ekfac 0.45 vs identity 0.21: the
gap holds, the level drops, as exact influence concentrates on a few high-loss sequences.
"""

from __future__ import annotations

import pytest
import torch
from conftest import char_sequences, correlation, lm_batches, query_batches

import ekfac_influence as ei

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity", "lissa")

# threshold = measured − margin; the margin covers BLAS and platform rounding, not a different answer
DIGITS_MINIMUM = {"ekfac": 0.72, "kfac": 0.72, "lissa": 0.90, "diagonal": 0.33, "identity": 0.32}
LM_MINIMUM = {"ekfac": 0.60, "kfac": 0.60, "lissa": 0.75, "diagonal": 0.45, "identity": 0.40}


def strategy_correlations(model, train, queries, objective) -> dict[str, float]:
    scores = {}
    for strategy in ("exact",) + STRATEGIES:
        config = ei.FactorConfig(strategy=strategy, factor_dtype="float64")
        factors = ei.fit_factors(model, train, objective, config, show_progress=False)
        scores[strategy] = ei.compute_scores(model, factors, queries, train, objective,
                                             ei.ScoreConfig(compute_dtype="float64"), show_progress=False).scores
    return {strategy: correlation(scores["exact"], scores[strategy]) for strategy in STRATEGIES}


def report(name: str, measured: dict[str, float]) -> None:
    print(f"\n{name}: correlation with exact influence: " + "  ".join(f"{k} {v:.3f}" for k, v in measured.items()))


def test_on_a_digits_mlp_ekfac_tracks_exact_influence_far_better_than_gradient_dot_products(digits):
    model, train, queries = digits
    measured = strategy_correlations(model, train, queries, ei.ClassificationObjective())
    report("digits MLP", measured)
    for strategy, minimum in DIGITS_MINIMUM.items():
        assert measured[strategy] >= minimum, (strategy, measured)
    assert measured["ekfac"] >= measured["identity"] + 0.3
    assert measured["ekfac"] >= measured["diagonal"] + 0.3


def test_on_a_tiny_transformer_lm_ekfac_tracks_exact_influence_far_better_than_gradient_dot_products(trained_llama):
    train = lm_batches(char_sequences(32, 24), 8)
    queries = query_batches([("the assert statement", " raises assertionerror"), ("def f(x):", " return x"),
                             ("a for loop", " iterates over the items"), ("the import statement", " loads a module")])
    measured = strategy_correlations(trained_llama, train, queries, ei.CausalLMObjective())
    report("tiny Llama", measured)
    for strategy, minimum in LM_MINIMUM.items():
        assert measured[strategy] >= minimum, (strategy, measured)
    assert measured["ekfac"] >= measured["identity"] + 0.12
