"""GPU checks that CPU tests cannot make: CUDA kernels, bf16 on the GPU, NCCL, FSDP over several GPUs.

Run on a GPU machine from the repository root, first alone, then under torchrun with the same output
directory; the second run compares itself with the first and prints what it checked:

    python scripts/check_gpu.py --out /tmp/gpu-check                       # 1 GPU, unsharded reference
    torchrun --nproc_per_node 2 scripts/check_gpu.py --out /tmp/gpu-check --fsdp   # 2 GPUs, FSDP2, NCCL

What it checks (each line printed as PASS or FAIL with the measured figure):
  1. a float32 model on the GPU gives the factors and scores of the same model on the CPU (rel. 1e-4);
  2. the same model in bf16 on the GPU: score correlation with float32 above 0.99, factors finite;
  3. under torchrun with --fsdp: the weights are DTensors (sharded), NCCL carries the reduces, and
     factors and scores equal the 1-GPU reference (rel. 1e-4), with an uneven number of batches;
  4. peak GPU memory of the fit and of the scoring, printed for the record.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import char_sequences, correlation, lm_batches, query_batches  # noqa: E402

import ekfac_influence as ei  # noqa: E402
from ekfac_influence import distributed  # noqa: E402

QUERIES = [("the assert statement", " raises assertionerror"), ("def f(x):", " return x"), ("a for loop", " iterates")]


def build(dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import VOCAB

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def fit_and_score(model) -> dict[str, torch.Tensor]:
    train = lm_batches(char_sequences(27, 64), 4)  # 7 batches: uneven over 2 processes
    objective = ei.CausalLMObjective()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    factors = ei.fit_factors(model, train, objective, ei.FactorConfig(), show_progress=False)
    fit_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    result = ei.compute_scores(model, factors, query_batches(QUERIES), train, objective, ei.ScoreConfig(),
                               show_progress=False)
    score_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    out = {"scores": result.scores.float().cpu(), "peak": torch.tensor([fit_peak, score_peak])}
    for layer in factors.layers:
        out[f"{layer.name}/lambda_OI"] = layer.lambda_OI.float().cpu()
    return out


def report(name: str, ok: bool, figure: str) -> bool:
    distributed.print0(f"{'PASS' if ok else 'FAIL'}  {name}: {figure}")
    return ok


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the 1-GPU reference")
    parser.add_argument("--fsdp", action="store_true", help="shard the weights with FSDP2 (under torchrun)")
    args = parser.parse_args()
    out = Path(args.out)
    device = str(distributed.device("auto"))
    results = []
    if distributed.world() == 1:
        out.mkdir(parents=True, exist_ok=True)
        gpu = fit_and_score(build(torch.float32, device))
        cpu = fit_and_score(build(torch.float32, "cpu"))
        results.append(report("float32 on the GPU = on the CPU (scores)", relative(gpu["scores"], cpu["scores"]) < 1e-4,
                              f"relative difference {relative(gpu['scores'], cpu['scores']):.2e}"))
        bf16 = fit_and_score(build(torch.bfloat16, device))
        corr = correlation(bf16["scores"], gpu["scores"])
        finite = all(bool(torch.isfinite(v).all()) for v in bf16.values())
        results.append(report("bf16 on the GPU vs float32", corr > 0.99 and finite, f"score correlation {corr:.4f}"))
        torch.save(gpu, out / "reference.pt")
        distributed.print0(f"peak GPU memory: fit {gpu['peak'][0] / 2**20:.0f} MiB, score {gpu['peak'][1] / 2**20:.0f} MiB")
    else:
        model = build(torch.float32, device)
        if args.fsdp:
            model = distributed.shard_model(model)
        sharded = type(model.model.layers[0].mlp.down_proj.weight).__name__ == "DTensor"
        mine = fit_and_score(model)
        if distributed.is_main():
            reference = torch.load(out / "reference.pt")
            results.append(report("weights sharded", sharded or not args.fsdp, f"DTensor weights: {sharded}"))
            for key in ("scores", *[k for k in reference if k.endswith("lambda_OI")][:3]):
                difference = relative(mine[key], reference[key])
                results.append(report(f"{distributed.world()} processes = 1 GPU ({key})", difference < 1e-4,
                                      f"relative difference {difference:.2e}"))
            distributed.print0(f"peak GPU memory per process: fit {mine['peak'][0] / 2**20:.0f} MiB, "
                               f"score {mine['peak'][1] / 2**20:.0f} MiB")
    if distributed.is_main():
        print("all checks passed" if all(results) else "SOME CHECKS FAILED")
        sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
