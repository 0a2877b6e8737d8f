"""How far to trust the results: measurements on the user's own model, corpus and queries.

Shortlist recall. The shortlist keeps the top K sequences by BM25; influence is then computed for
those only. recall@k = |top_k(exhaustive influence) ∩ shortlist| / k, per query: the share of the
sequences that scoring every sequence would rank in the top k that the shortlist kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .data import Query, encode_query
from .factors import Factors
from .model import context_length
from .query import check_index_matches, query_influence, shortlist_candidates
from .shortlist import ShortlistError


class RecallAtK(NamedTuple):
    per_query: np.ndarray  # [Q] float64, each the share of that query's exhaustive top-k in its shortlist
    mean: float


def shortlist_recall(shortlist_ids: Sequence[int], exhaustive_ids: Sequence[int], k: int) -> float:
    """Share of the exhaustive top-k found in the shortlist: |top_k(exhaustive) ∩ shortlist| / |top_k|.

    `exhaustive_ids` are sequence ids ranked best first by scoring every sequence (its first k, or
    all of them when fewer, are the reference set); `shortlist_ids` are the candidates, in any order.
    """
    if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1):
        raise ShortlistError(f"k must be a positive integer, got {k!r}")
    top = np.asarray(exhaustive_ids).reshape(-1)[:k]
    if top.size == 0:
        raise ShortlistError("the exhaustive ranking is empty: there is no top-k to recall")
    if np.unique(top).size != top.size:
        raise ShortlistError("the exhaustive top-k repeats a sequence id; pass each query's ranking of distinct ids")
    return float(np.isin(top, np.asarray(shortlist_ids).reshape(-1)).mean())


def recall_at_k(shortlist_ids_per_query: Sequence[Sequence[int]], exhaustive_ids_per_query: Sequence[Sequence[int]],
                k: int) -> RecallAtK:
    """`shortlist_recall` for each query (rows of [Q, *] arrays or lists) and its mean over queries."""
    if len(shortlist_ids_per_query) != len(exhaustive_ids_per_query):
        raise ShortlistError(f"{len(shortlist_ids_per_query)} shortlists but {len(exhaustive_ids_per_query)} "
                             f"exhaustive rankings: pass one of each per query")
    if len(shortlist_ids_per_query) == 0:
        raise ShortlistError("no queries: recall needs at least one shortlist and its exhaustive ranking")
    per_query = np.array([shortlist_recall(s, e, k) for s, e in zip(shortlist_ids_per_query, exhaustive_ids_per_query)])
    return RecallAtK(per_query, float(per_query.mean()))


def shortlist_recall_audit(model, tokenizer, factors: Factors, corpus, queries: list, index, config,
                           *, k: int = 10, show_progress: bool = True) -> dict:
    """How much of the exhaustive influence top-k does the shortlist keep? recall@k per query and mean.

    Scores every sequence for every query (candidates = all: an epoch's cost, so audit a sample of
    queries). The exhaustive ranking is the full-rank rescored top (exact) followed by the scan order;
    the shortlist is the top `config.shortlist_k` by BM25 over the same prompt + completion tokens.
    """
    check_index_matches(index, corpus)
    exhaustive = query_influence(model, tokenizer, factors, corpus, queries,
                                 dataclasses.replace(config, candidates="all", top_k=max(k, config.top_k)),
                                 show_progress=show_progress)
    rankings = []
    for q, record in enumerate(exhaustive.records):
        exact = [hit["sequence"] for hit in record["top_positive"]]
        scan = [int(n) for n in np.argsort(-np.nan_to_num(np.asarray(exhaustive.scores_QN[q]), nan=-np.inf), kind="stable")]
        rankings.append((exact + [n for n in scan if n not in set(exact)])[:k])
    encoded = [encode_query(tokenizer, Query(r["prompt"], r["completion"], r["contrast"], r["id"]),
                            max_length=context_length(model)) for r in exhaustive.queries]
    shortlists = shortlist_candidates(index, encoded, config.shortlist_k, query_counts=config.shortlist_query_counts)
    recall = recall_at_k(shortlists, rankings, k)
    return {"k": k, "shortlist_k": config.shortlist_k, "num_sequences": len(corpus), "mean_recall": recall.mean,
            "per_query": {r["id"]: float(value) for r, value in zip(exhaustive.queries, recall.per_query)}}
