"""Fidelity benchmark: how close each strategy comes to exact influence, and at what cost.

Two models small enough for the exact damped Gauss-Newton (built densely, V backwards per position):
  digits   a 64 → 24 → 10 tanh MLP on scikit-learn's digits (1,810 parameters), 1,000 training
           examples, 30 held-out queries
  llama    a 2-block Llama (hidden 16, both MLP blocks tracked: 3,072 parameters) trained briefly on
           Python's documentation, character-level, 32 training sequences × 24 tokens, 4 queries
(the models and data of tests/test_accuracy.py). For each variant it prints the correlation with
exact influence (mean over queries of the Pearson correlation across training examples) and its
cost: fit + score seconds as a ratio to one training epoch (forward + backward + AdamW over the same
training batches) measured in the same run, next to it.

    python scripts/bench_fidelity.py               # the variants of docs/accuracy.md (~3 minutes on 2 cores)
    python scripts/bench_fidelity.py --damping     # also: correlation as damping_factor moves
    python scripts/bench_fidelity.py --seeds 8     # ekfac over 8 label seeds: mean ± standard error
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import (_digits, _trained_llama_state, _trained_mlp_state, char_sequences, correlation,  # noqa: E402
                      lm_batches, make_llama, make_mlp, query_batches)

import ekfac_influence as ei  # noqa: E402

LM_QUERIES = [("the assert statement", " raises assertionerror"), ("def f(x):", " return x"),
              ("a for loop", " iterates over the items"), ("the import statement", " loads a module")]


def settings() -> dict:
    X, y = _digits()
    mlp = make_mlp()
    mlp.load_state_dict(_trained_mlp_state())
    llama = make_llama()
    llama.load_state_dict(_trained_llama_state())
    return {
        "digits": (mlp.eval(), [(X[i : i + 100], y[i : i + 100]) for i in range(0, 1000, 100)],
                   [(X[1500:1530], y[1500:1530])], ei.ClassificationObjective()),
        "llama": (llama.eval(), lm_batches(char_sequences(32, 24), 8), query_batches(LM_QUERIES), ei.CausalLMObjective()),
    }


def epoch_seconds(model, train, objective, repeats: int = 3) -> float:
    """One training epoch: forward + backward + AdamW step per batch, on a copy of the model (median)."""
    times = []
    for _ in range(repeats):
        copied = copy.deepcopy(model).train()
        optimizer = torch.optim.AdamW(copied.parameters(), lr=1e-4)
        start = time.perf_counter()
        for batch in train:
            loss = objective.train_loss(copied, batch, sample_labels=False)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def variants(damping_factor: float = 0.1) -> list[tuple[str, ei.FactorConfig, ei.ScoreConfig]]:
    F = lambda **k: ei.FactorConfig(factor_dtype="float64", damping_factor=damping_factor, **k)  # noqa: E731
    S = lambda **k: ei.ScoreConfig(compute_dtype="float64", **k)  # noqa: E731
    refine = lambda steps: S(refine_steps=steps, refine_tolerance=0.0)  # noqa: E731
    return [("kfac", F(strategy="kfac"), S()), ("ekfac", F(), S()), ("ekfac, 4 label samples", F(label_samples=4), S()),
            ("ekfac + 1 refinement step", F(), refine(1)), ("ekfac + 3 refinement steps", F(), refine(3)),
            ("ekfac + 10 refinement steps", F(), refine(10)), ("lissa", F(strategy="lissa"), S()),
            ("identity", F(strategy="identity"), S())]


def measure(model, train, queries, objective, chosen, damping_factor: float = 0.1) -> list[tuple[str, float, float]]:
    exact_config = ei.FactorConfig(strategy="exact", factor_dtype="float64", damping_factor=damping_factor)
    exact = ei.fit_factors(model, train, objective, exact_config, show_progress=False)
    reference = ei.compute_scores(model, exact, queries, train, objective, ei.ScoreConfig(compute_dtype="float64"),
                                  show_progress=False).scores
    rows = []
    for name, factor_config, score_config in chosen:
        epoch_before = epoch_seconds(model, train, objective)
        start = time.perf_counter()
        factors = ei.fit_factors(model, train, objective, factor_config, show_progress=False)
        scores = ei.compute_scores(model, factors, queries, train, objective, score_config, show_progress=False).scores
        seconds = time.perf_counter() - start
        epoch = (epoch_before + epoch_seconds(model, train, objective)) / 2
        rows.append((name, correlation(reference, scores), seconds / epoch))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--damping", action="store_true", help="also sweep damping_factor")
    parser.add_argument("--seeds", type=int, default=0, help="also: ekfac over this many label seeds")
    parser.add_argument("--only", choices=["digits", "llama"], help="one model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, (model, train, queries, objective) in settings().items():
        if args.only and name != args.only:
            continue
        print(f"\n{name}: correlation with exact influence | (fit + score) / training epoch")
        for variant, value, ratio in measure(model, train, queries, objective, variants()):
            print(f"  {variant:30s} {value:.3f}   {ratio:8.1f}")
        if args.seeds:
            values = [measure(model, train, queries, objective,
                              [("ekfac", ei.FactorConfig(factor_dtype="float64", seed=seed),
                                ei.ScoreConfig(compute_dtype="float64"))])[0][1] for seed in range(args.seeds)]
            error = statistics.stdev(values) / len(values) ** 0.5
            print(f"  ekfac over {args.seeds} label seeds: {statistics.mean(values):.4f} ± {error:.4f}")
        if args.damping:
            print("  damping_factor sweep (exact influence at the same damping): ekfac | + 3 steps | + 10 steps")
            for factor in (0.001, 0.01, 0.1, 1.0):
                chosen = [v for v in variants(factor) if v[0] in ("ekfac", "ekfac + 3 refinement steps",
                                                                   "ekfac + 10 refinement steps")]
                values = [value for _, value, _ in measure(model, train, queries, objective, chosen, factor)]
                print(f"    {factor:<6g} " + "  ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
