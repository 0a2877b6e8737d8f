"""How far to trust the results: measurements on the user's own model, corpus and queries.

    evaluate_lm(model, tokenizer, corpus, queries, variants, EvaluateConfig(), out="runs/x/evaluation")

runs, for a causal LM over a packed corpus, the two measurements of `lds` and `planted` with the
built-in trainer (`train`) and writes the table (`scorecard`). LDS: every model, the reference
included, is trained by `train_lm` from the same initialisation (`init: scratch`: weights drawn
anew for the model's architecture; `init: model`: the model's own weights, i.e. fine-tuning) on the
training sequences, in the same data order minus the removed ones; the queries are `queries` and
`heldout_queries` sequences held out of training (prompt = first half of their real tokens,
completion = the rest). The reference model and every retrained subset are cached under
`out/lds/`, so a rerun with more variants retrains nothing and an interrupted one resumes.

Shortlist recall. The shortlist keeps the top K sequences by BM25; influence is then computed for
those only. recall@k = |top_k(exhaustive influence) ∩ shortlist| / k, per query: the share of the
sequences that scoring every sequence would rank in the top k that the shortlist kept.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors.torch import load_model, save_model
from torch import nn

from .config import ConfigError, EvaluateConfig, QueryConfig, to_dict
from .data import PackedCorpus, pad_token_id
from .factors import Factors
from .files import file_mode
from .lds import LDSResult, linear_datamodeling_score
from .model import context_length, fingerprint
from .objectives import CausalLMObjective
from .planted import corpus_batches, planted_fact_recall
from .query import as_query, check_index_matches, complete_queries, query_influence, shortlist_candidates
from .query_inputs import Query, collate_query_rows, encode_query
from .scorecard import format_table, plain, write_evaluation
from .shortlist import ShortlistError
from .storage import atomic_write_text
from .train import LMTraining, reinitialised, train_lm
from .variants import Variant


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


# ----------------------------------------------------------------------------- LDS and planted facts of a causal LM


def heldout_split(num_sequences: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows), sorted: `count` rows drawn by numpy's Generator([seed, 1])."""
    if count >= num_sequences:
        raise ConfigError(f"evaluate.heldout_queries: {count} held-out sequences leave none of the {num_sequences} "
                          f"to train on; hold out fewer")
    heldout = np.sort(np.random.default_rng([seed, 1]).choice(num_sequences, size=count, replace=False))
    return np.setdiff1d(np.arange(num_sequences), heldout), heldout


def lm_query_rows(model, tokenizer, corpus: PackedCorpus, queries: Sequence, heldout: np.ndarray) -> list[tuple]:
    """(prompt ids, completion ids) of each query and held-out sequence.

    A query without a completion gets the model's greedy one; a contrast is not measured (f = log p(completion | prompt)).
    """
    encoded, _ = complete_queries(model, tokenizer, [as_query(q, i) for i, q in enumerate(queries)], QueryConfig())
    rows = [item.rows()[0] for item in encoded]
    for n in heldout:
        ids = [int(t) for t in corpus.tokens_NT[n, : corpus.lengths_N[n]]]
        if len(ids) < 2:
            continue
        rows.append((ids[: len(ids) // 2], ids[len(ids) // 2 :]))
    if not rows:
        raise ConfigError("evaluate: no query to measure; set queries.file or evaluate.heldout_queries > 0")
    return rows


def lm_lds(model: nn.Module, tokenizer, corpus: PackedCorpus, queries: Sequence, variants: Sequence[Variant],
           config: EvaluateConfig, *, cache_dir, show_progress: bool = True) -> LDSResult:
    """The LDS of each variant for a causal LM, retrained by `train_lm` (see the module docstring)."""
    train_rows, heldout = heldout_split(len(corpus), config.heldout_queries, config.seed)
    rows = lm_query_rows(model, tokenizer, corpus, queries, heldout)
    query_batches = [collate_query_rows(rows[i : i + 16], pad_token_id(tokenizer)) for i in range(0, len(rows), 16)]
    training = LMTraining(epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
                          weight_decay=config.weight_decay)

    def train_fn(indices: np.ndarray, seed: int) -> nn.Module:
        start = reinitialised(model, seed) if config.init == "scratch" else copy.deepcopy(model)
        train_lm(start, corpus.tokens_NT, corpus.lengths_N, dataclasses.replace(training, seed=seed),
                 indices=train_rows[indices])
        return start

    setup = {"init": config.init, "training": dataclasses.asdict(training), "corpus_id": corpus.corpus_id,
             "heldout": hashlib.sha256(heldout.tobytes()).hexdigest()[:16],
             "model": fingerprint(model) if config.init == "model" else model.config.to_json_string(use_diff=False)}
    cache_key = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]
    reference = _reference_model(Path(cache_dir), cache_key, lambda: train_fn(np.arange(len(train_rows)), 0),
                                 lambda: reinitialised(model, 0) if config.init == "scratch" else copy.deepcopy(model))
    train_batches = corpus_batches(_rows(corpus, train_rows), config.score_batch_size)
    result = linear_datamodeling_score(reference, train_batches, query_batches, CausalLMObjective(), train_fn,
                                       variants, config, cache_dir=cache_dir, cache_key=cache_key,
                                       show_progress=show_progress)
    result.settings = {"init": config.init, "epochs": config.epochs, "heldout_queries": int(len(heldout)),
                       "text_queries": len(queries)}
    return result


def _rows(corpus: PackedCorpus, rows: np.ndarray) -> PackedCorpus:
    return PackedCorpus(np.asarray(corpus.tokens_NT)[rows], np.asarray(corpus.lengths_N)[rows], [],
                        corpus.pad_token_id, corpus.tokenizer_id)


def _reference_model(directory: Path, key: str, train, fresh) -> nn.Module:
    """The model trained on every training sequence: from `directory` when trained with this key, else trained now."""
    weights, stamp = directory / "reference.safetensors", directory / "reference.json"
    if stamp.exists() and weights.exists() and json.loads(stamp.read_text()).get("key") == key:
        model = fresh()
        load_model(model, str(weights))
        return model.eval()
    model = train()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".reference.safetensors.tmp"
    save_model(model, str(tmp))
    os.chmod(tmp, file_mode())  # safetensors writes 0600
    os.replace(tmp, weights)
    atomic_write_text(stamp, json.dumps({"key": key}))
    return model.eval()


def evaluate_lm(model: nn.Module, tokenizer, corpus: PackedCorpus, queries: Sequence, variants: Sequence[Variant],
                config: EvaluateConfig = EvaluateConfig(), *, out, overwrite: bool = False,
                show_progress: bool = True) -> dict:
    """Run `config.measurements` for a causal LM, print the table, write evaluation.json and .html in `out`."""
    out = Path(out)
    if overwrite and out.exists():
        shutil.rmtree(out)  # the cache of retrained models too: everything is measured again
    results = {"title": f"Accuracy of influence on {type(model).__name__} over {len(corpus)} sequences",
               "config": to_dict(config)}
    if "lds" in config.measurements:
        results["lds"] = lm_lds(model, tokenizer, corpus, queries, variants, config, cache_dir=out / "lds",
                                show_progress=show_progress).to_dict()
    if "planted" in config.measurements:
        results["planted"] = planted_fact_recall(model, tokenizer, corpus, variants, config, show_progress=show_progress)
    results = plain(results)
    written = write_evaluation(out, results)
    print(format_table(results))
    print(f"\nwritten: {written['json']} and {written['html']}")
    return results
