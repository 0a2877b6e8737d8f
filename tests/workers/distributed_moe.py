"""Fit EK-FAC factors of a tiny Mixtral (4 experts, top-2) and score, under torchrun or alone; save what rank 0 sees.

    torchrun --nproc_per_node 2 tests/workers/distributed_moe.py OUT.safetensors
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import char_sequences, lm_batches, query_batches  # noqa: E402
from test_experts import tiny_mixtral  # noqa: E402

import ekfac_influence as ei  # noqa: E402
from ekfac_influence import distributed  # noqa: E402

if __name__ == "__main__":
    # gate_up_proj 16 × 16: each expert's ~66 routed tokens give full-rank factors, whose eigenvectors are unique
    # (those of a rank-deficient S are not, and then neither are Λ and the scores, with any number of processes)
    model = tiny_mixtral(intermediate=8)
    train = lm_batches(char_sequences(11, 12), 3, pad_to=13)  # 4 batches, the last one of 2: uneven over 2 processes
    objective = ei.CausalLMObjective()
    factors = ei.fit_factors(model, train, objective, ei.FactorConfig(factor_dtype="float64"), show_progress=False)
    result = ei.compute_scores(model, factors, query_batches([("the assert statement", " raises"), ("def f(x):", " return x")]),
                               train, objective, ei.ScoreConfig(compute_dtype="float64"), show_progress=False)
    out = {"scores": result.scores, "world": torch.tensor(distributed.world()),
           "counts": torch.tensor([factors.num_sequences, factors.num_tokens])}
    for layer in factors.layers:
        for key in ("A_II", "S_OO", "lambda_OI"):
            out[f"{layer.name}/{key}"] = getattr(layer, key)
    if distributed.is_main():
        save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[1])
