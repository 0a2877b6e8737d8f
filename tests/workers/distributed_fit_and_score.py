"""Fit EK-FAC factors and score, under torchrun / accelerate launch or alone; save what rank 0 sees.

    torchrun --nproc_per_node 2 tests/workers/distributed_fit_and_score.py MODEL.safetensors OUT.safetensors
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import char_sequences, lm_batches, make_llama, query_batches  # noqa: E402

import ekfac_influence as ei  # noqa: E402
from ekfac_influence import distributed  # noqa: E402

QUERIES = [("the assert statement", " raises assertionerror"), ("def f(x):", " return x"), ("a for loop", " iterates")]


def count_preconditioned_queries() -> list[int]:
    """Wrap the preconditioner so that it counts the queries this process preconditions."""
    from ekfac_influence import influence

    count, original = [0], influence.precondition

    def counting(grads, *args, **kwargs):
        count[0] += next(iter(grads.values())).shape[0]
        return original(grads, *args, **kwargs)

    influence.precondition = counting
    return count


def run(model_path: str) -> dict[str, torch.Tensor]:
    count = count_preconditioned_queries()
    model = make_llama()
    model.load_state_dict(load_file(model_path))
    train = lm_batches(char_sequences(27, 16), 4)  # 7 batches, the last one of 3: uneven over 2 processes
    objective = ei.CausalLMObjective()
    factors = ei.fit_factors(model, train, objective, ei.FactorConfig(factor_dtype="float64"), show_progress=False)
    result = ei.compute_scores(model, factors, query_batches(QUERIES, batch_size=1), train, objective,
                               ei.ScoreConfig(per_token=True, compute_dtype="float64"), show_progress=False)
    out = {"scores": result.scores, "per_token": result.per_token,
           "counts": torch.tensor([factors.num_sequences, factors.num_tokens, result.num_train_sequences])}
    for layer in factors.layers:
        out[f"{layer.name}/A_II"] = layer.A_II
        out[f"{layer.name}/S_OO"] = layer.S_OO
        out[f"{layer.name}/lambda_OI"] = layer.lambda_OI
    distributed._BUCKET_BYTES = 4096  # many small all-reduce buckets
    blocked = ei.fit_factors(model, train, objective, ei.FactorConfig(factor_dtype="float64", blocks=2), show_progress=False)
    for layer in blocked.layers:  # block-diagonal factors: blocks reduced and broadcast in place
        out[f"blocked/{layer.name}/A_II"] = layer.A_II.dense()
        out[f"blocked/{layer.name}/lambda_OI"] = layer.lambda_OI
    refined = ei.compute_scores(model, factors, query_batches(QUERIES, batch_size=2), train, objective,
                                ei.ScoreConfig(compute_dtype="float64", refine_steps=2, refine_batches=5,
                                               refine_tolerance=0.0), show_progress=False)
    out["refined_scores"] = refined.scores  # Gauss-Newton products over 5 of 7 batches, sharded and reduced
    out["world"] = torch.tensor(distributed.world())
    split = distributed.gather_by_key({distributed.rank(): count[0]})
    out["queries_by_process"] = torch.tensor([split[rank] for rank in sorted(split)])
    return out


if __name__ == "__main__":
    tensors = run(sys.argv[1])
    if distributed.is_main():
        save_file({k: v.contiguous() for k, v in tensors.items()}, sys.argv[2])
