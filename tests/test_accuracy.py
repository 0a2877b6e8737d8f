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


def test_block_diagonal_factors_cost_little_accuracy_on_the_digits_mlp(digits, capsys, tmp_path):
    """The paper's 52B setting splits wide factors into 2 diagonal blocks; measure what that costs."""
    model, train, queries = digits
    objective = ei.ClassificationObjective()
    scores, sizes = {}, {}
    for name, config in (("exact", ei.FactorConfig(strategy="exact", factor_dtype="float64")),
                         ("full", ei.FactorConfig(factor_dtype="float64")),
                         ("2 blocks", ei.FactorConfig(factor_dtype="float64", blocks=2)),
                         ("4 blocks", ei.FactorConfig(factor_dtype="float64", blocks=4))):
        factors = ei.fit_factors(model, train, objective, config, show_progress=False)
        if name != "exact":  # blocked factors are kept as their blocks, on disk too
            sizes[name] = sum(f.numel() for layer in factors.layers for f in (layer.A_II, layer.S_OO, layer.QA_II, layer.QS_OO))
            factors.save(tmp_path / name)
            factors = ei.Factors.load(tmp_path / name, model=model)
        scores[name] = ei.compute_scores(model, factors, queries, train, objective,
                                         ei.ScoreConfig(compute_dtype="float64"), show_progress=False).scores
    assert sizes["full"] / sizes["2 blocks"] > 1.9 and sizes["full"] / sizes["4 blocks"] > 3.5
    measured = {name: (correlation(scores["exact"], scores[name]), correlation(scores["full"], scores[name]))
                for name in ("full", "2 blocks", "4 blocks")}
    with capsys.disabled():
        print("\nblock-diagonal EK-FAC on the digits MLP (corr. with exact, with full factors): "
              + "  ".join(f"{name} {a:.3f}/{b:.3f}" for name, (a, b) in measured.items()))
    # measured: full 0.775, 2 blocks 0.681 (0.974 with full), 4 blocks 0.609 (0.937 with full)
    assert measured["2 blocks"][1] > 0.9 and measured["4 blocks"][1] > 0.8
    assert measured["2 blocks"][0] > measured["full"][0] - 0.15
    assert measured["2 blocks"][1] < 1 - 1e-6  # the blocks really change the factors
