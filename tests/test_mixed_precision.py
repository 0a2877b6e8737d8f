"""bf16 weights, activations and gradients with float64 factor accumulation, as LLMs are run in practice."""

from __future__ import annotations

import torch

from conftest import char_sequences, correlation, lm_batches, query_batches

import ekfac_influence as ei


def test_a_bf16_model_gives_the_influence_of_its_float32_original(trained_llama, capsys):
    train = lm_batches(char_sequences(32, 24), 8)
    queries = query_batches([("the assert statement", " raises assertionerror"), ("def f(x):", " return x"),
                             ("the import statement", " loads a module")])
    objective, scores, factors = ei.CausalLMObjective(), {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = trained_llama.to(dtype)
        factors[dtype] = ei.fit_factors(model, train, objective, ei.FactorConfig(), show_progress=False)
        scores[dtype] = ei.compute_scores(model, factors[dtype], queries, train, objective, ei.ScoreConfig(),
                                          show_progress=False).scores
    for layer in factors[torch.bfloat16].layers:
        assert layer.lambda_OI.dtype == torch.float32 and bool(torch.isfinite(layer.lambda_OI).all())
    measured = correlation(scores[torch.float32], scores[torch.bfloat16])
    eigen = min(torch.corrcoef(torch.stack([a.lambda_OI.flatten(), b.lambda_OI.flatten()]))[0, 1].item()
                for a, b in zip(factors[torch.float32].layers, factors[torch.bfloat16].layers))
    with capsys.disabled():
        print(f"\nbf16 vs float32: score correlation {measured:.4f}, worst layer eigenvalue correlation {eigen:.4f}")
    assert measured > 0.95
    assert eigen > 0.95
