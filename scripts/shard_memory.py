"""Measured factor memory per process of a sharded fit (factors.shard: auto) on 1, 2 and 4 processes, and
what float32 accumulation changes in the scores; the tables of docs/scaling.md.

    python scripts/shard_memory.py                 # launches 1, 2, 4 processes (torchrun, gloo, CPU); ~2 min on 2 cores
    python scripts/shard_memory.py --accumulate    # float64 vs float32 running sums: factors and scores, 1 process

Job: a Llama built in code (hidden 64, MLP 256, 8 blocks, float32, untrained, seeded), its 24 MLP
linears tracked; 64 sequences of 64 characters of Python's documentation in batches of 8; EK-FAC.
"Measured" = `fit.HELD_BYTES`: the bytes of the factor tensors each process actually holds at the
end of each step (local sums, reduced sums, eigenvectors, Λ), the largest over processes; beside
it `plan_fit`'s prediction (what `ekfac-influence fit --dry-run` prints).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def job(dtype=torch.float32, accumulate: str = "float64", shard: str = "auto", batch_size: int = 8):
    from conftest import char_sequences, lm_batches, make_llama

    import ekfac_influence as ei

    model = make_llama(hidden=64, layers=8, intermediate=256, dtype=dtype)
    train = lm_batches(char_sequences(64, 64), batch_size)
    config = ei.FactorConfig(shard=shard, accumulate_dtype=accumulate, factor_dtype="float64")
    return model, train, config


def worker(out: Path) -> None:
    import ekfac_influence as ei
    from ekfac_influence import distributed, fit

    torch.set_num_threads(1)
    model, train, config = job()
    factors = ei.fit_factors(model, train, ei.CausalLMObjective(), config, show_progress=False)
    held = distributed.gather_by_key({distributed.rank(): dict(fit.HELD_BYTES)})
    kept = distributed.gather_by_key({distributed.rank(): sum(factors.held(n) for n in factors.layer_names)})
    if distributed.is_main():
        out.write_text(json.dumps({"held": [held[r] for r in sorted(held)], "layers": [kept[r] for r in sorted(kept)]}))


def memory_table() -> None:
    from ekfac_influence.model import select_layers
    from ekfac_influence.plan import STEPS, plan_fit

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2, 4):
            out = Path(tmp) / f"{world}.json"
            launch = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                          "--nproc_per_node", str(world), "--master_port", str(29600 + world)]
            done = subprocess.run(launch + [__file__, "--worker", str(out)], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            results[world] = json.loads(out.read_text())
    model, _, config = job()
    layers = select_layers(model, None)
    print(f"{len(layers)} tracked linears; bytes of factor tensors held per process (largest over processes), "
          f"measured / planned by `fit --dry-run`\n")
    print("| step | 1 process | 2 processes | 4 processes | 2 / 1 | 4 / 1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for step in STEPS:
        cells, measured = [], {}
        for world in (1, 2, 4):
            measured[world] = max(h[step] for h in results[world]["held"])
            planned = plan_fit(model, layers, config, world, model_dtype="float32").steps[step]
            cells.append(f"{measured[world]:,} / {planned:,}")
        print(f"| {step} | " + " | ".join(cells) + f" | {measured[2] / measured[1]:.3f} | {measured[4] / measured[1]:.3f} |")
    print("\nlayers held per process: " + "; ".join(f"{w}: {results[w]['layers']}" for w in (1, 2, 4)))


def accumulate_table() -> None:
    """Factors and scores with float32 running sums against float64 ones (1 process)."""
    import ekfac_influence as ei
    from conftest import query_batches

    queries = [("the assert statement", " raises assertionerror"), ("def f(x):", " return x"), ("a for loop", " iterates"),
               ("the while statement", " repeats"), ("import sys", " loads a module")]
    print("| model | batches summed | max relative difference of A, S | of Λ | max |Δ score| / max |score| | "
          "rank correlation of scores |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dtype, compute, batch_size in ((torch.float32, "float32", 8), (torch.float32, "float32", 1),
                                       (torch.float64, "float64", 8)):
        fitted = {}
        for accumulate in ("float64", "float32"):
            model, train, config = job(dtype, accumulate, shard="none", batch_size=batch_size)
            factors = ei.fit_factors(model, train, ei.CausalLMObjective(), config, show_progress=False)
            scores = ei.compute_scores(model, factors, query_batches(queries), train, ei.CausalLMObjective(),
                                       ei.ScoreConfig(compute_dtype=compute), show_progress=False).scores
            fitted[accumulate] = (factors, scores.double())
        (f64, s64), (f32, s32) = fitted["float64"], fitted["float32"]
        cov = max(float((getattr(b, k) - getattr(a, k)).abs().max() / getattr(a, k).abs().max())
                  for a, b in zip(f64.layers, f32.layers) for k in ("A_II", "S_OO"))
        lam = max(float((b.lambda_OI - a.lambda_OI).abs().max() / a.lambda_OI.abs().max()) for a, b in zip(f64.layers, f32.layers))
        score = float((s32 - s64).abs().max() / s64.abs().max())
        ranks = [float(torch.corrcoef(torch.stack([x.argsort().argsort().double(), y.argsort().argsort().double()]))[0, 1])
                 for x, y in zip(s64, s32)]
        print(f"| Llama hidden 64, 8 blocks, {str(dtype).removeprefix('torch.')} | {64 // batch_size} | {cov:.1e} | {lam:.1e} | {score:.1e} | "
              f"{min(ranks):.6f} (lowest of {len(ranks)} queries) |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--accumulate", action="store_true", help="the float32-accumulation table instead")
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
    elif args.accumulate:
        accumulate_table()
    else:
        memory_table()
