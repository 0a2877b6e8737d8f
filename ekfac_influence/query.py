"""The query stage: which training sequences made the model complete these prompts this way?

Shapes: Q queries, R query rows (a contrastive query has two), N training sequences, C candidates,
B batch, T positions, I in-features (+1 bias), O out-features, K rank.

    1. complete: a query without a completion gets the model's greedy one (bounded length)
    2. precondition: ∇f_q = Σ_r M_qr ∇log p(row r) (M = +1, or −1 for a contrast), P(∇f_q) per
       layer, kept as a rank-k factorisation (default k = 32) so hundreds of queries share one scan
    3. scan: one forward/backward per batch of candidates scores every query at once; all scores go
       to a memory-mapped Q × N float32 file as they come, and a running top-k is kept
    4. rescore: each query's best and worst scan candidates are scored again with full-rank query
       gradients, split by layer and by token; the final top-k come from these scores
    5. record: each query's top sequences with their text, provenance and splits, written as the
       query set's directory

Steps 2-4 are passes over data and live in `scan`; this module orchestrates and writes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed
from .config import QueryConfig, to_dict
from .data import DataError, PackedCorpus, pad_token_id, tokenizer_id
from .factors import Factors, check_factors_match
from .files import allocate_file, ensure_space
from .model import context_length
from .objectives import IGNORE_INDEX, CausalLMObjective
from .passes import device_of, evaluation_mode
from .precondition import compress
from .query_inputs import EncodedQuery, Query, collate_query_rows, encode_query, query_rows
from .scan import dense_rescoring_fits, preconditioned_queries, rescore, scan
from .storage import PassCheckpoint, StorageError, replace_directory
from .token_text import token_pieces
from .version import __version__

SCORES_FILE, TOPK_FILE, QUERIES_FILE, MANIFEST_FILE = "scores.f32", "topk.jsonl", "queries.jsonl", "manifest.json"


@dataclass
class QueryResults:
    """What a query run found. `records[q]` holds the top positive and negative sequences of query q."""

    queries: list[dict]  # resolved queries: id, prompt, completion, contrast, generated, logp
    records: list[dict]
    scores_QN: np.ndarray  # scan scores (rank-k when config.rank is set); NaN = not scanned
    num_train_sequences: int
    layer_names: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each step


def query_influence(model: nn.Module, tokenizer, factors: Factors, corpus: PackedCorpus, queries: list,
                    config: QueryConfig = QueryConfig(), *, candidates: list[np.ndarray] | None = None,
                    index=None, out=None, overwrite: bool = False, show_progress: bool = True,
                    self_influence_N: np.ndarray | None = None) -> QueryResults:
    """Influence of every candidate training sequence on log p(completion | prompt), per query.

    candidates: per query, the sequence indices to consider; None = all, or with
    `config.candidates == "shortlist"` the top `config.shortlist_k` of `index` (a ShortlistIndex of
    this corpus) for the query's prompt + completion tokens.
    out: the query set's directory (docs/design.md §4 `queries/<set>/`), written atomically at the end.
    self_influence_N: with `config.normalize`, s(n) of every sequence of `corpus` under these factors (a
    self-influence audit's `values`): the scan then keeps each query's best candidates by the normalised score,
    so that the rescored pool is the best normalised one; without it the pool is the best raw candidates.
    """
    layers = check_factors_match(factors, model)
    if factors.strategy == "lissa":
        raise ValueError("the lissa strategy needs passes over the training data per query; use compute_scores for it")
    if config.refine_steps > 0 and factors.strategy == "exact":
        raise ValueError("the exact strategy solves exactly: set query.refine_steps to 0")
    if factors.owners is not None and (config.refine_steps > 0 or config.normalize != "none"):
        raise ValueError("refinement and normalised scores need every layer's factors on every process, and these "
                         "factors are sharded: load them whole (Factors.load(path)) or set refine_steps 0, normalize none")
    if corpus.tokenizer_id != tokenizer_id(tokenizer):
        raise DataError("the corpus was packed with another tokenizer than the model's; pack it again with this tokenizer")
    queries = [as_query(q, i) for i, q in enumerate(queries)]
    if not queries:
        raise DataError("no query given")
    if candidates is not None and len(candidates) != len(queries):
        raise ValueError(f"{len(candidates)} candidate sets for {len(queries)} queries")
    if self_influence_N is not None:
        self_influence_N = np.asarray(self_influence_N, dtype=np.float64)
        if config.normalize == "none":
            self_influence_N = None  # a raw ranking keeps the raw pool
        elif self_influence_N.shape != (len(corpus),) or not np.isfinite(self_influence_N).all():
            raise ValueError(f"self_influence_N must hold a finite s(n) for each of the corpus's {len(corpus)} "
                             f"sequences, got shape {self_influence_N.shape}")
    if config.candidates == "shortlist" and candidates is None:
        check_index_matches(index, corpus)
    out = None if out is None else Path(out)
    if out is not None and out.exists() and not overwrite:
        raise StorageError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) or choose another query set name")
    clock = _Clock()
    with evaluation_mode(model):
        encoded, generated = complete_queries(model, tokenizer, queries, config)
        if config.candidates == "shortlist" and candidates is None:
            candidates = shortlist_candidates(index, encoded, config.shortlist_k,
                                              query_counts=config.shortlist_query_counts)
        logp_Q = measure(model, tokenizer, encoded)
        clock.lap("complete")
        key = {"fingerprint": factors.fingerprint, "strategy": factors.strategy, "corpus_id": corpus.corpus_id,
               "config": {k: v for k, v in to_dict(config).items() if not k.startswith(("checkpoint", "num_workers"))},
               "queries": _digest([item.rows() for item in encoded]),
               "candidates": None if candidates is None else _digest([np.asarray(c).tolist() for c in candidates]),
               **({} if self_influence_N is None else
                  {"pool_by": hashlib.sha256(self_influence_N.tobytes()).hexdigest()[:16]})}
        if out is not None and distributed.is_main():  # the scores file, before anything is written
            kept = out.parent / f".{out.name}.partial" / SCORES_FILE  # a resumed scan's file is there already
            ensure_space(out.parent, 4 * len(encoded) * len(corpus) - (kept.stat().st_size if kept.exists() else 0),
                         f"the scores file of {len(encoded)} queries × {len(corpus)} sequences")
        tmp = _work_directory(out, key)
        checkpoint = None if tmp is None else PassCheckpoint(tmp, key, every_batches=config.checkpoint_batches,
                                                              every_seconds=config.checkpoint_seconds)
        dense = None
        if config.refine_steps > 0 or dense_rescoring_fits(layers, len(encoded), config):
            # full rank once (refined, or as the rescoring would precondition them again): truncated for the scan,
            # sliced for the rescoring
            dense = preconditioned_queries(model, layers, factors, tokenizer, encoded, config, rank=None, corpus=corpus,
                                           checkpoint=checkpoint, show_progress=show_progress)
            P = dense if config.rank is None else {name: compress(value, config.rank) for name, value in dense.items()}
        else:
            P = preconditioned_queries(model, layers, factors, tokenizer, encoded, config, rank=config.rank)
        clock.lap("precondition")
        # the partial directory survives an interruption: a rerun resumes the scan from its last save
        scores_QN = _scores_file(tmp, len(encoded), len(corpus))
        best = scan(model, layers, P, corpus, candidates, scores_QN, config, show_progress=show_progress,
                    checkpoint=checkpoint, self_influence_N=self_influence_N)
        clock.lap("scan")
        full = P if config.rank is None or config.rerank == 0 else None
        details = rescore(model, layers, factors, tokenizer, encoded, corpus, best, config, full, dense=dense,
                          show_progress=show_progress)
        clock.lap("rescore")
        resolved = [_resolved(item, gen, float(lp)) for item, gen, lp in zip(encoded, generated, logp_Q)]
        train_size = config.train_size or len(corpus)  # the training set being explained (README: delta_logp)
        records = [_record(q, resolved[q], details[q], corpus, tokenizer, train_size, config,
                           len(corpus) if candidates is None else len(candidates[q]),
                           pooled=self_influence_N is not None) for q in range(len(encoded))]
        results = QueryResults(resolved, records, scores_QN, train_size, [l.name for l in layers], clock.laps)
        distributed.barrier()
        if out is not None and distributed.is_main():
            _write(tmp, out, results, factors, tokenizer, corpus, config)
            results.scores_QN = np.memmap(out / SCORES_FILE, dtype=np.float32, mode="r", shape=scores_QN.shape)
    return results


class _Clock:
    def __init__(self):
        self._time, self.laps = time.perf_counter, {}
        self._last = self._time()

    def lap(self, name: str) -> None:
        now = self._time()
        self.laps[name] = now - self._last
        self._last = now


def as_query(value, index: int) -> Query:
    """A Query from a Query, a dict {"prompt", "completion", ...}, a (prompt, completion) pair or a prompt."""
    if isinstance(value, Query):
        return value if value.id is not None else Query(value.prompt, value.completion, value.contrast, f"q{index}")
    if isinstance(value, dict):
        unknown = set(value) - {"prompt", "completion", "contrast", "id"}
        if unknown:
            raise DataError(f"query {index}: unknown key(s) {', '.join(sorted(unknown))}")
        return Query(value.get("prompt"), value.get("completion"), value.get("contrast"), str(value.get("id", f"q{index}")))
    if isinstance(value, str):
        return Query(value, None, None, f"q{index}")
    if isinstance(value, (tuple, list)) and 1 <= len(value) <= 3:
        return Query(*value, id=f"q{index}")
    raise DataError(f"query {index}: expected a Query, a dict, a prompt or a (prompt, completion) pair, got {value!r}")


def check_index_matches(index, corpus: PackedCorpus) -> None:
    """The shortlist index must be built over this very corpus (and so this tokenizer)."""
    if index is None:
        raise ValueError("candidates = shortlist needs a shortlist index: build one (ekfac-influence index) and pass it")
    if index.num_sequences != len(corpus) or (index.corpus_id and index.corpus_id != corpus.corpus_id):
        raise DataError(f"the shortlist index was built over another corpus ({index.num_sequences} sequences, id "
                        f"{index.corpus_id}; this corpus has {len(corpus)}, id {corpus.corpus_id}); rebuild it "
                        f"(ekfac-influence index --overwrite)")
    if index.tokenizer_id and index.tokenizer_id != corpus.tokenizer_id:
        raise DataError("the shortlist index was built with another tokenizer; rebuild it (ekfac-influence index --overwrite)")


def shortlist_candidates(index, encoded: list[EncodedQuery], k: int, *, query_counts: bool = True) -> list[np.ndarray]:
    """Each query's top-k sequences by BM25 over its prompt + completion (+ contrast) tokens."""
    tokens = [item.prompt_ids + item.completion_ids + (item.contrast_ids or []) for item in encoded]
    ids_QK, _ = index.search_batch(tokens, k, query_counts=query_counts)
    return [np.asarray(row, dtype=np.int64) for row in ids_QK]


# ----------------------------------------------------------------------------- 1. complete


def complete_queries(model, tokenizer, queries: list[Query], config: QueryConfig) -> tuple[list[EncodedQuery], list[bool]]:
    """Encode every query; a query without a completion gets the model's greedy completion (its own tokens)."""
    limit = context_length(model)
    encoded, generated = [], []
    for query in queries:
        if query.completion is not None:
            encoded.append(encode_query(tokenizer, query, max_length=limit))
            generated.append(False)
            continue
        prompt_ids = list(tokenizer(query.prompt)["input_ids"])
        room = min(config.max_new_tokens, limit - len(prompt_ids))
        if room <= 0:
            raise DataError(f"query {query.id}: the prompt is {len(prompt_ids)} tokens, the model's context is {limit}; "
                            "no room for a completion")
        new_ids = greedy_completion(model, tokenizer, prompt_ids, room)
        if not new_ids:
            raise DataError(f"query {query.id}: the model's greedy completion is empty (it ends the text at once); "
                            "give a completion")
        completion = Query(query.prompt, tokenizer.decode(new_ids), query.contrast, query.id)
        contrast_ids = None
        if query.contrast is not None:
            contrast_ids = encode_query(tokenizer, Query(query.prompt, query.contrast, None, query.id),
                                        max_length=limit).completion_ids
        encoded.append(EncodedQuery(completion, prompt_ids, new_ids, contrast_ids))
        generated.append(True)
    return encoded, generated


@torch.no_grad()
def greedy_completion(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The model's greedy continuation, cut before the first end-of-text token."""
    device = device_of(model)
    ids = torch.tensor([prompt_ids], device=device)
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=pad_token_id(tokenizer))
    new_ids = output[0, len(prompt_ids):].tolist()
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    for position, token in enumerate(new_ids):
        if token in stop:
            return new_ids[:position]
    return new_ids


@torch.no_grad()
def measure(model, tokenizer, encoded: list[EncodedQuery], rows_per_batch: int = 16) -> Tensor:
    """f_q = log p(completion | prompt) − log p(contrast | prompt) for every query, [Q] float64."""
    rows, M_QR = query_rows(encoded)
    objective, values = CausalLMObjective(), []
    for start in range(0, len(rows), rows_per_batch):
        batch = collate_query_rows(rows[start : start + rows_per_batch], pad_token_id(tokenizer))
        batch = {key: value.to(device_of(model)) for key, value in batch.items()}
        logits_BTV, labels_BT = objective.logits(model, batch)
        logp_BTV = torch.log_softmax(logits_BTV.double(), dim=-1)
        picked_BT = logp_BTV.gather(-1, labels_BT.clamp_min(0)[..., None])[..., 0]
        values.append(picked_BT.masked_fill(labels_BT == IGNORE_INDEX, 0).sum(1).cpu())
    return M_QR @ torch.cat(values)


# ----------------------------------------------------------------------------- results


def is_spurious(per_token: list[float], threshold: float = 2 / 3) -> bool:
    """The paper's flag: token influences so concentrated that ‖a‖₂ / ‖a‖₁ > threshold."""
    a = np.asarray(per_token, dtype=np.float64)
    l1 = np.abs(a).sum()
    return bool(l1 > 0 and np.sqrt((a * a).sum()) / l1 > threshold)


def _resolved(item: EncodedQuery, generated: bool, logp: float) -> dict:
    q = item.query
    return {"id": q.id, "prompt": q.prompt, "completion": q.completion, "contrast": q.contrast, "generated": generated,
            "logp": logp, "prompt_tokens": len(item.prompt_ids), "completion_tokens": len(item.completion_ids)}


def _record(q: int, resolved: dict, details: dict[int, dict], corpus: PackedCorpus, tokenizer, num_train: int,
            config: QueryConfig, num_candidates: int, *, pooled: bool = False) -> dict:
    """pooled: the rescored pool was the scan's best normalised candidates (s(n) given), not its best raw ones."""
    key = "score" if config.normalize == "none" else "normalized_score"  # the raw score is kept either way
    ranked = sorted(details.items(), key=lambda item: -item[1][key])
    positive = [item for item in ranked if item[1][key] > 0][: config.top_k]
    negative = [item for item in reversed(ranked) if item[1][key] < 0][: config.top_k]

    def hit(rank: int, n: int, detail: dict) -> dict:
        length = int(corpus.lengths_N[n])
        tokens, text = token_pieces(tokenizer, [int(t) for t in corpus.tokens_NT[n, :length]])
        return {"rank": rank, "sequence": n, "score": detail["score"], "delta_logp": detail["score"] / num_train,
                "spurious": is_spurious(detail["per_token"], config.spurious_threshold),
                "per_layer": detail["per_layer"], "per_token": detail["per_token"],
                "tokens": tokens, "text": text,
                "provenance": corpus.provenance[n],
                **({} if key == "score" else {"normalized_score": detail[key], "self_influence": detail["self_influence"]})}

    pool = "normalised" if pooled else "raw"
    ranking = {} if key == "score" else {
        "ranking": f"{config.normalize} (normalized_score ranks, score is raw; rescored: the scan's best {pool} scores)"}
    return {"query": q, **resolved, "num_candidates": num_candidates, **ranking,
            "top_positive": [hit(r + 1, n, d) for r, (n, d) in enumerate(positive)],
            "top_negative": [hit(r + 1, n, d) for r, (n, d) in enumerate(negative)]}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def _work_directory(out: Path | None, key: dict) -> Path | None:
    """`.<set>.partial/` beside the query set: the scan's scores and progress until the set is finished.

    Kept when the query is interrupted, so a rerun with the same queries, model and config resumes
    the scan; emptied when anything else changed. Renamed to the query set's name at the end.
    """
    if out is None:
        return None
    path = out.parent / f".{out.name}.partial"
    if distributed.is_main():
        stamp = path / "key.json"
        if path.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != json.loads(json.dumps(key))):
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(key))
    distributed.barrier()
    return path


def _scores_file(tmp: Path | None, Q: int, N: int) -> np.ndarray:
    """Q × N float32, NaN until scanned: a memory map in the run directory, or memory without one.

    Every process writes into the main process's file, so the query set's directory must be on a
    file system all processes of a node share.
    """
    if tmp is None:
        return np.full((Q, N), np.nan, dtype=np.float32)
    path = tmp / SCORES_FILE
    if distributed.is_main() and not (path.exists() and path.stat().st_size == 4 * Q * N):
        allocate_file(path, 4 * Q * N, f"the scores file of {Q} queries × {N} sequences")  # no SIGBUS on a full disk
        scores = np.memmap(path, dtype=np.float32, mode="r+", shape=(Q, N))
        scores[:] = np.nan
        scores.flush()
    distributed.barrier()  # the file exists before the others open it
    return np.memmap(path, dtype=np.float32, mode="r+", shape=(Q, N))


def _write(tmp: Path, out: Path, results: QueryResults, factors: Factors, tokenizer, corpus: PackedCorpus,
           config: QueryConfig) -> None:
    """Everything into the temporary directory, then one rename: readers see all of it or nothing."""
    Q, N = results.scores_QN.shape
    (tmp / QUERIES_FILE).write_text("".join(json.dumps(q) + "\n" for q in results.queries))
    (tmp / TOPK_FILE).write_text("".join(json.dumps(r) + "\n" for r in results.records))
    manifest = {"kind": "ekfac_influence.queries", "version": __version__, "num_queries": Q, "num_sequences": N,
                "scores": {"file": SCORES_FILE, "dtype": "float32", "shape": [Q, N], "order": "C",
                           "meaning": "scan scores (rank-k when config.rank is set); NaN = not scanned"},
                "fingerprint": factors.fingerprint, "strategy": factors.strategy, "tokenizer_id": tokenizer_id(tokenizer),
                "corpus_id": corpus.corpus_id, "num_train_sequences": results.num_train_sequences,
                "factors_corpus": dict(factors.meta.get("corpus") or {}, num_sequences=factors.num_sequences),
                "layers": results.layer_names, "config": to_dict(config),
                "seconds": {step: round(value, 3) for step, value in results.seconds.items()}}  # wall time per step
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    for progress in [tmp / "key.json", *tmp.glob("scan.rank*"), *tmp.glob("refine.rank*")]:
        progress.unlink()
    replace_directory(tmp, out)
