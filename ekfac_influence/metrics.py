"""The numbers the evaluation reports, as plain numpy: Spearman's ρ, the LDS, recall@k and MRR.

Shapes: Q queries, N training sequences, M subsets.

Linear datamodeling score (Park et al., 2023, TRAK). For subsets S_1..S_M of the training set, each
model retrained on S_m gives f_q(S_m); the attribution predicts it up to an affine map by
g_q(S_m) = Σ_{n ∈ S_m} score(q, n). Then

    LDS_q = ρ_spearman( (g_q(S_m))_m, (f_q(S_m))_m ),    LDS = mean_q LDS_q,  SE = std_q(LDS_q) / √Q.

Planted-fact retrieval. Sequences are ranked by score, best first; a sequence that is not a candidate
(NaN score) is never retrieved; ties are broken against the planted sequences (pessimistic). For a
query with relevant (planted) set R and r_1 ≤ r_2 ≤ ... the ranks of its members,

    recall@k = |{i : r_i ≤ k}| / min(k, |R|),      RR = 1 / r_1   (0 when none is retrieved),

and MRR is the mean of RR over queries.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np


class MeanSE(NamedTuple):
    """A mean over queries with its standard error std(ddof=1) / √count (NaN values left out)."""

    mean: float
    se: float
    count: int


def mean_and_se(values: Iterable[float]) -> MeanSE:
    """mean and standard error of the finite values; se = 0 for one value, both NaN for none."""
    x = np.asarray(list(values), dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return MeanSE(float("nan"), float("nan"), 0)
    se = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0
    return MeanSE(float(x.mean()), se, int(x.size))


def average_ranks(x_M: np.ndarray) -> np.ndarray:
    """Ranks 1..M of the values (ties share the mean of their ranks), as scipy.stats.rankdata."""
    x_M = np.asarray(x_M, dtype=np.float64)
    order = np.argsort(x_M, kind="stable")
    sorted_x = x_M[order]
    # each run of equal values [start, end) gets the rank (start + 1 + end) / 2
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x_M.size]
    ranks_sorted = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def spearman(x_M: np.ndarray, y_M: np.ndarray) -> float:
    """ρ = Pearson correlation of the average ranks of x and of y; NaN when either is constant."""
    x_M, y_M = np.asarray(x_M, dtype=np.float64), np.asarray(y_M, dtype=np.float64)
    if x_M.shape != y_M.shape or x_M.ndim != 1 or x_M.size < 2:
        raise ValueError(f"spearman needs two vectors of one length >= 2, got shapes {x_M.shape} and {y_M.shape}")
    if not (np.isfinite(x_M).all() and np.isfinite(y_M).all()):
        raise ValueError("spearman: the values must be finite")
    rx, ry = average_ranks(x_M), average_ranks(y_M)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def subset_predictions(scores_QN: np.ndarray, subsets_MN: np.ndarray) -> np.ndarray:
    """g_MQ = Σ_{n ∈ S_m} score(q, n): the summed influence of each subset on each query."""
    scores_QN = np.asarray(scores_QN, dtype=np.float64)
    subsets_MN = np.asarray(subsets_MN, dtype=np.float64)
    if scores_QN.shape[1] != subsets_MN.shape[1]:
        raise ValueError(f"scores cover {scores_QN.shape[1]} training sequences, the subsets {subsets_MN.shape[1]}")
    return subsets_MN @ scores_QN.T


def lds_per_query(scores_QN: np.ndarray, subsets_MN: np.ndarray, f_MQ: np.ndarray) -> np.ndarray:
    """LDS_q = ρ_spearman over subsets of (Σ_{n ∈ S_m} score(q, n), f_q(S_m)), [Q]; NaN where f_q is constant."""
    g_MQ = subset_predictions(scores_QN, subsets_MN)
    f_MQ = np.asarray(f_MQ, dtype=np.float64)
    if f_MQ.shape != g_MQ.shape:
        raise ValueError(f"f has shape {f_MQ.shape}; expected [subsets, queries] = {list(g_MQ.shape)}")
    return np.array([spearman(g_MQ[:, q], f_MQ[:, q]) for q in range(g_MQ.shape[1])])


def retrieval_ranks(scores_N: np.ndarray, relevant: Sequence[int]) -> np.ndarray:
    """Rank (1 = best) of each relevant sequence, sorted; ties go against them; inf = not a candidate (NaN)."""
    scores_N = np.asarray(scores_N, dtype=np.float64)
    relevant = np.unique(np.asarray(relevant, dtype=np.int64))
    if relevant.size == 0:
        raise ValueError("a query needs at least one relevant (planted) sequence")
    is_relevant_N = np.zeros(scores_N.size, dtype=bool)
    is_relevant_N[relevant] = True
    candidate_N = np.isfinite(scores_N)
    # best first; among equal scores the other sequences come first
    order = np.lexsort((is_relevant_N, -np.where(candidate_N, scores_N, -np.inf)))
    rank_N = np.empty(scores_N.size)
    rank_N[order] = np.arange(1, scores_N.size + 1)
    ranks = np.where(candidate_N[relevant], rank_N[relevant], np.inf)
    return np.sort(ranks)


def recall_at(ranks: np.ndarray, k: int) -> float:
    """|{i : r_i ≤ k}| / min(k, |R|) for the ranks of one query's relevant sequences."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return float((ranks <= k).sum() / min(k, ranks.size))


def reciprocal_rank(ranks: np.ndarray) -> float:
    """1 / (rank of the best relevant sequence); 0 when none is retrieved."""
    best = float(np.min(ranks))
    return 0.0 if not np.isfinite(best) else 1.0 / best


def retrieval_metrics(scores_QN: np.ndarray, relevant_Q: Sequence[Sequence[int]], ks: Sequence[int]) -> dict:
    """{"recall@k": MeanSE for each k, "mrr": MeanSE, "per_query": [{"ranks", "recall@k", "rr"}]}."""
    scores_QN = np.asarray(scores_QN, dtype=np.float64)
    if len(relevant_Q) != scores_QN.shape[0]:
        raise ValueError(f"{len(relevant_Q)} relevant sets for {scores_QN.shape[0]} queries")
    per_query = []
    for scores_N, relevant in zip(scores_QN, relevant_Q):
        ranks = retrieval_ranks(scores_N, relevant)
        per_query.append({"ranks": [None if not np.isfinite(r) else int(r) for r in ranks],
                          **{f"recall@{k}": recall_at(ranks, k) for k in ks}, "rr": reciprocal_rank(ranks)})
    summary = {f"recall@{k}": mean_and_se(p[f"recall@{k}"] for p in per_query) for k in ks}
    summary["mrr"] = mean_and_se(p["rr"] for p in per_query)
    summary["per_query"] = per_query
    return summary
