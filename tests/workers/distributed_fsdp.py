"""Fit and score a tiny Llama whose weights FSDP2 shards over the processes (torchrun); rank 0 saves.

    torchrun --nproc_per_node 2 tests/workers/distributed_fsdp.py OUT.safetensors [SHARD]

SHARD (`none` or `auto`) is factors.shard: with `auto` each process also owns half of the layers'
factors; they are saved as shards and loaded back whole for the comparison.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import char_sequences, lm_batches, make_llama, query_batches  # noqa: E402

import ekfac_influence as ei  # noqa: E402
from ekfac_influence import distributed  # noqa: E402


def run(path: Path, shard: str = "none") -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    model = distributed.shard_model(make_llama())  # float64; unchanged on one process
    train = lm_batches(char_sequences(18, 16), 4)
    objective = ei.CausalLMObjective()
    config = ei.FactorConfig(factor_dtype="float64", shard=shard)
    factors = ei.fit_factors(model, train, objective, config, show_progress=False)
    result = ei.compute_scores(model, factors, query_batches([("the assert statement", " raises"), ("x = 1", " + 2")]),
                               train, objective, ei.ScoreConfig(per_token=True, compute_dtype="float64"),
                               show_progress=False)
    owners = torch.tensor(len(set((factors.owners or {}).values())))  # processes that own layers' factors
    sharded = type(model.model.layers[0].mlp.down_proj.weight).__name__ == "DTensor"
    out = {"scores": result.scores, "per_token": result.per_token, "sharded": torch.tensor(int(sharded)), "owners": owners,
           "fingerprint": torch.tensor([int(c, 16) for c in factors.fingerprint])}
    if shard != "none":
        factors.save(path.with_suffix(".factors"), overwrite=True)
        distributed.barrier()
        factors = ei.Factors.load(path.with_suffix(".factors"))  # every layer, whichever process owned it
    for layer in factors.layers:
        out[f"{layer.name}/lambda_OI"] = layer.lambda_OI
        out[f"{layer.name}/QA_II"] = layer.QA_II
    return out


if __name__ == "__main__":
    tensors = run(Path(sys.argv[1]), *sys.argv[2:])
    if distributed.is_main():
        save_file({k: v.contiguous() for k, v in tensors.items()}, sys.argv[1])
