"""Fit EK-FAC factors sharded by layer (factors.shard: auto), save the shards, score; alone or under torchrun.

    torchrun --nproc_per_node 2 tests/workers/distributed_shard.py OUT_DIR [BLOCKS [STRATEGY [LAYERS]]]

Writes OUT_DIR/factors/ (the shards and their manifest) and, from rank 0, OUT_DIR/result.safetensors:
the scores (dense and rank-2 query gradients), the counts, and per process the factor bytes held
after each step of the fit and the layers each process loaded back (`Factors.load(shard=...)`).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import char_sequences, lm_batches, make_llama, query_batches  # noqa: E402

import ekfac_influence as ei  # noqa: E402
from ekfac_influence import distributed, fit  # noqa: E402

QUERIES = [("the assert statement", " raises assertionerror"), ("def f(x):", " return x"), ("a for loop", " iterates")]
STEPS = ("covariance pass: local sums", "covariances reduced", "eigendecomposed",
         "correction pass: local sums and eigenvectors", "fitted")


def run(out: Path, blocks: int = 1, strategy: str = "ekfac", layers: str | None = None) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    model = make_llama(hidden=16, layers=6, intermediate=32)  # 18 tracked MLP linears
    train = lm_batches(char_sequences(27, 16), 4)  # 7 batches, the last one of 3: uneven over 2 and 4 processes
    objective = ei.CausalLMObjective()
    config = ei.FactorConfig(strategy=strategy, factor_dtype="float64", shard="auto", blocks=blocks, block_min_dim=32,
                             layers=None if layers is None else (layers,))
    factors = ei.fit_factors(model, train, objective, config, show_progress=False)
    held = torch.tensor([fit.HELD_BYTES.get(step, 0) for step in STEPS], dtype=torch.float64)
    factors.save(out / "factors", overwrite=True)
    result = {"counts": torch.tensor([factors.num_sequences, factors.num_tokens])}
    for rank_k in (None, 2):
        scores = ei.compute_scores(model, factors, query_batches(QUERIES, batch_size=1), train, objective,
                                   ei.ScoreConfig(compute_dtype="float64", rank=rank_k), show_progress=False)
        result[f"scores/rank{rank_k}"] = scores.scores
    loaded = ei.Factors.load(out / "factors", model=model, shard=(distributed.rank(), distributed.world()))
    mine = [layer.name for layer in loaded.layers if loaded.held(layer.name)]
    fitted_here = [layer.name for layer in factors.layers if factors.held(layer.name)]
    parts = distributed.gather_by_key({distributed.rank(): (held, len(mine), mine == fitted_here)})
    result["held_bytes"] = torch.stack([parts[r][0] for r in sorted(parts)])
    result["loaded_layers"] = torch.tensor([parts[r][1] for r in sorted(parts)])
    result["loaded_as_fitted"] = torch.tensor([parts[r][2] for r in sorted(parts)])
    result["world"] = torch.tensor(distributed.world())
    return result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    arguments = sys.argv[2:]
    tensors = run(out, blocks=int(arguments[0]) if arguments else 1, strategy=arguments[1] if len(arguments) > 1 else "ekfac",
                  layers=arguments[2] if len(arguments) > 2 else None)
    if distributed.is_main():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "result.safetensors"))
