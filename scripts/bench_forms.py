"""Where each contraction form wins: the score kernels and the self-influence rotations, timed one by one.

Scores (`ekfac_influence.scores`): one layer of the engine benchmark's shape (O × I = 512 × 128), a
batch of B = 8 sequences of T = 128 positions, Q dense query gradients (or rank-32 ones), a share
of the positions padding (right-padded; the first sequence is full, so no position can be trimmed). Each form that applies is timed,
and the cost model's choice (`choose_form`) is marked. Self-influence and the EK-FAC correction (`factors.rotated_gradients`):
the rotation R = Q_Sᵀ (Σ_t g_t ā_tᵀ) Q_A of B = 8 sequences in each of its four orders, for
several T and two layer shapes, the cost model's choice marked.

    python scripts/bench_forms.py               # about a minute on 2 CPU cores (1 torch thread)
    python scripts/bench_forms.py --threads 2

Times are the median of `--repeats` runs of each kernel (float32, CPU). Random inputs: the
kernels' time does not depend on the values.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ekfac_influence.config import ROTATION_ORDERS
from ekfac_influence.factors import rotated_gradients, rotation_order
from ekfac_influence.precondition import LowRank
from ekfac_influence.scores import choose_form, layer_scores, trimmed


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def score_table(repeats: int) -> None:
    B, T, O, I = 8, 128, 512, 128
    print(f"### Score kernels: one layer O × I = {O} × {I}, B = {B} sequences × T = {T} positions (ms per batch)\n")
    print("| queries | padding | sequences | tokens | rank 32 | cost model's choice |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for Q in (1, 4, 16, 128):
        for padding in (0.0, 0.5, 0.9):
            # the first sequence full (so no position can be trimmed), the others share the rest of the real tokens
            rest = max(1, round((B * T * (1 - padding) - T) / (B - 1)))
            lengths = torch.tensor([T] + [rest] * (B - 1))
            mask_BT = torch.arange(T)[None] < lengths[:, None]
            d = torch.randn(B, T, O) * mask_BT[..., None]
            a = torch.randn(B, T, I) * mask_BT[..., None]
            P = torch.randn(Q, O, I)
            low = LowRank(torch.randn(Q, O, 32), torch.randn(Q, I, 32))
            cells = {}
            for form, query in (("sequences", P), ("tokens", P), ("rank", low)):
                seconds = median_seconds(lambda: layer_scores(query, d, a, per_token=False,
                                                              mask_BT=None if not padding else mask_BT, form=form),
                                         repeats)
                cells[form] = f"{1000 * seconds:.1f}"
            N = int(mask_BT.sum())
            chosen = choose_form(P, B, trimmed(d, a, mask_BT)[0].shape[1], N, per_token=False)
            cells[chosen] = f"**{cells[chosen]}**"
            print(f"| {Q} | {100 * (1 - N / (B * T)):.0f}% | {cells['sequences']} | {cells['tokens']} | {cells['rank']} | "
                  f"{chosen} (dense P) |")
    print("\nrank 32: an approximate P (rank-32 query gradients), shown for its cost; the cost model picks among the "
          "exact forms of a dense P, and for a rank-k P between its rank form and making it dense.\n")


def rotation_table(repeats: int) -> None:
    B = 8
    print(f"### Self-influence: the rotation Q_Sᵀ DW Q_A of B = {B} sequences (ms per batch)\n")
    print("| O × I | T | " + " | ".join(ROTATION_ORDERS) + " | cost model's choice |")
    print("| --- | ---: | " + " | ".join("---:" for _ in ROTATION_ORDERS) + " | --- |")
    for O, I in ((512, 128), (128, 512), (1536, 576)):
        QS, QA = torch.linalg.qr(torch.randn(O, O))[0], torch.linalg.qr(torch.randn(I, I))[0]
        for T in (32, 128, 512, 2048):
            if O * I * T > 2**29:
                continue
            g, a = torch.randn(B, T, O), torch.randn(B, T, I)
            cells = {order: f"{1000 * median_seconds(lambda: rotated_gradients(g, a, QS, QA, order), repeats):.1f}"
                     for order in ROTATION_ORDERS}
            chosen = rotation_order(T, O, I)
            cells[chosen] = f"**{cells[chosen]}**"
            print(f"| {O} × {I} | {T} | " + " | ".join(cells[o] for o in ROTATION_ORDERS) + f" | {chosen} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each kernel; the median is shown (default 5)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"- {time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, {torch.get_num_threads()} torch thread(s); "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    score_table(args.repeats)
    rotation_table(args.repeats)
    print(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
