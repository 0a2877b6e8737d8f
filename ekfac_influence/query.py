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
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__, distributed
from .config import QueryConfig, to_dict
from .data import DataError, EncodedQuery, PackedCorpus, PackedDataset, Query, collate_query_rows, encode_query, query_rows
from .data import pad_token_id, tokenizer_id
from .factors import Factors
from .model import TrackedLayer, context_length
from .objectives import IGNORE_INDEX, CausalLMObjective
from .passes import capture_pass, device_of, evaluation_mode
from .pipeline import check_factors_match, preconditioned_query_gradients
from .precondition import LowRank
from .scores import BatchScorer, pair_sequence_scores, pair_token_scores
from .storage import PassCheckpoint, StorageError, replace_directory

_DENSE_BUDGET_ELEMENTS = 2**28  # full-rank query gradients held at once in the rescoring stage
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
                    index=None, out=None, overwrite: bool = False, show_progress: bool = True) -> QueryResults:
    """Influence of every candidate training sequence on log p(completion | prompt), per query.

    candidates: per query, the sequence indices to consider; None = all, or with
    `config.candidates == "shortlist"` the top `config.shortlist_k` of `index` (a ShortlistIndex of
    this corpus) for the query's prompt + completion tokens.
    out: the query set's directory (DESIGN §4 `queries/<set>/`), written atomically at the end.
    """
    layers = check_factors_match(factors, model)
    if factors.strategy == "lissa":
        raise ValueError("the lissa strategy needs passes over the training data per query; use compute_scores for it")
    if corpus.tokenizer_id != tokenizer_id(tokenizer):
        raise DataError("the corpus was packed with another tokenizer than the model's; pack it again with this tokenizer")
    queries = [as_query(q, i) for i, q in enumerate(queries)]
    if not queries:
        raise DataError("no query given")
    if candidates is not None and len(candidates) != len(queries):
        raise ValueError(f"{len(candidates)} candidate sets for {len(queries)} queries")
    if config.candidates == "shortlist" and candidates is None:
        check_index_matches(index, corpus)
    out = None if out is None else Path(out)
    if out is not None and out.exists() and not overwrite:
        raise StorageError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) or choose another query set name")
    clock = _Clock()
    with evaluation_mode(model):
        encoded, generated = complete_queries(model, tokenizer, queries, config)
        if config.candidates == "shortlist" and candidates is None:
            candidates = shortlist_candidates(index, encoded, config.shortlist_k)
        logp_Q = measure(model, tokenizer, encoded)
        clock.lap("complete")
        P = preconditioned_queries(model, layers, factors, tokenizer, encoded, config, rank=config.rank)
        clock.lap("precondition")
        key = {"fingerprint": factors.fingerprint, "strategy": factors.strategy, "corpus_id": corpus.corpus_id,
               "config": {k: v for k, v in to_dict(config).items() if not k.startswith(("checkpoint", "num_workers"))},
               "queries": _digest([item.rows() for item in encoded]),
               "candidates": None if candidates is None else _digest([np.asarray(c).tolist() for c in candidates])}
        tmp = _work_directory(out, key)
        checkpoint = None if tmp is None else PassCheckpoint(tmp, key, every_batches=config.checkpoint_batches,
                                                              every_seconds=config.checkpoint_seconds)
        # the partial directory survives an interruption: a rerun resumes the scan from its last save
        scores_QN = _scores_file(tmp, len(encoded), len(corpus))
        best = scan(model, layers, P, corpus, candidates, scores_QN, config, show_progress=show_progress,
                    checkpoint=checkpoint)
        clock.lap("scan")
        full = P if config.rank is None or config.rerank == 0 else None
        details = rescore(model, layers, factors, tokenizer, encoded, corpus, best, config, full,
                          show_progress=show_progress)
        clock.lap("rescore")
        resolved = [_resolved(item, gen, float(lp)) for item, gen, lp in zip(encoded, generated, logp_Q)]
        records = [_record(q, resolved[q], details[q], corpus, tokenizer, factors.num_sequences, config,
                           len(corpus) if candidates is None else len(candidates[q])) for q in range(len(encoded))]
        results = QueryResults(resolved, records, scores_QN, factors.num_sequences, [l.name for l in layers], clock.laps)
        distributed.barrier()
        if out is not None and distributed.is_main():
            _write(tmp, out, results, factors, tokenizer, corpus, config)
            results.scores_QN = np.memmap(out / SCORES_FILE, dtype=np.float32, mode="r", shape=scores_QN.shape)
    return results


class _Clock:
    def __init__(self):
        import time

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


def shortlist_candidates(index, encoded: list[EncodedQuery], k: int) -> list[np.ndarray]:
    """Each query's top-k sequences by BM25 over its prompt + completion (+ contrast) tokens."""
    tokens = [item.prompt_ids + item.completion_ids + (item.contrast_ids or []) for item in encoded]
    ids_QK, _ = index.search_batch(tokens, k)
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


# ----------------------------------------------------------------------------- 2. precondition


def preconditioned_queries(model, layers: list[TrackedLayer], factors: Factors, tokenizer, encoded: list[EncodedQuery],
                           config: QueryConfig, *, rank: int | None) -> dict[str, Tensor | LowRank]:
    """{layer: P(∇f_q) for every query}: groups of queries split among the processes, gathered on all.

    Groups hold at most `query_batch_size` rows, and fewer when that leaves a process without a group.
    """
    rows = sum(len(item.rows()) for item in encoded)
    per_group = max(1, min(config.query_batch_size, -(-rows // distributed.world())))
    groups = [query_rows(group) for group in _query_groups(encoded, per_group)]
    batches = [collate_query_rows(rows, pad_token_id(tokenizer)) for rows, _ in groups]
    return preconditioned_query_gradients(model, layers, factors, batches, CausalLMObjective(),
                                          dtype=getattr(torch, config.compute_dtype), rank=rank,
                                          combine=[M_QR for _, M_QR in groups], show_progress=False)


def _query_groups(encoded: list[EncodedQuery], rows_per_group: int):
    group, rows = [], 0
    for item in encoded:
        if group and rows + len(item.rows()) > rows_per_group:
            yield group
            group, rows = [], 0
        group.append(item)
        rows += len(item.rows())
    if group:
        yield group


# ----------------------------------------------------------------------------- 3. scan


class RunningTopK:
    """The k largest and k smallest scores seen so far per query, with their sequence indices."""

    def __init__(self, Q: int, k: int):
        self.k = k
        self.pos_values, self.neg_values = torch.full((Q, 0), -torch.inf), torch.full((Q, 0), torch.inf)
        self.pos_ids, self.neg_ids = torch.zeros((Q, 0), dtype=torch.long), torch.zeros((Q, 0), dtype=torch.long)

    def update(self, values_QC: Tensor, ids_C: Tensor, member_QC: Tensor) -> None:
        ids_QC = ids_C.expand_as(values_QC)
        self.pos_values, self.pos_ids = self._merge(self.pos_values, self.pos_ids, values_QC.masked_fill(~member_QC, -torch.inf), ids_QC, True)
        self.neg_values, self.neg_ids = self._merge(self.neg_values, self.neg_ids, values_QC.masked_fill(~member_QC, torch.inf), ids_QC, False)

    def _merge(self, values, ids, new_values, new_ids, largest: bool):
        values, ids = torch.cat([values, new_values], 1), torch.cat([ids, new_ids], 1)
        kept = torch.topk(values, min(self.k, values.shape[1]), dim=1, largest=largest, sorted=True).indices
        return values.gather(1, kept), ids.gather(1, kept)

    def merge(self, other: "RunningTopK") -> None:
        """Fold in the lists of another process (which saw other sequences)."""
        self.pos_values, self.pos_ids = self._merge(self.pos_values, self.pos_ids, other.pos_values, other.pos_ids, True)
        self.neg_values, self.neg_ids = self._merge(self.neg_values, self.neg_ids, other.neg_values, other.neg_ids, False)

    def restore(self, checkpoint: PassCheckpoint | None) -> int:
        """Load a saved state; returns the index of the first batch still to scan."""
        state = checkpoint.load("scan") if checkpoint is not None else None
        if state is None:
            return 0
        tensors, meta = state
        self.pos_values, self.pos_ids = tensors["pos_values"], tensors["pos_ids"]
        self.neg_values, self.neg_ids = tensors["neg_values"], tensors["neg_ids"]
        distributed.print0(f"resuming the scan at batch {meta['next_batch']} (saved progress)")
        return meta["next_batch"]

    def save(self, checkpoint: PassCheckpoint, next_batch: int) -> None:
        checkpoint.save("scan", {"pos_values": self.pos_values, "pos_ids": self.pos_ids, "neg_values": self.neg_values,
                                 "neg_ids": self.neg_ids}, {"next_batch": next_batch})

    def selected(self, q: int, count: int) -> list[int]:
        """Sequence indices of query q's `count` best and `count` worst (finite) scores, without repeats."""
        chosen = []
        for values, ids in ((self.pos_values, self.pos_ids), (self.neg_values, self.neg_ids)):
            chosen += [int(i) for v, i in zip(values[q, :count].tolist(), ids[q, :count].tolist()) if np.isfinite(v)]
        return list(dict.fromkeys(chosen))


def scan(model, layers: list[TrackedLayer], P: dict, corpus: PackedCorpus, candidates: list[np.ndarray] | None,
         scores_QN: np.ndarray, config: QueryConfig, *, show_progress: bool = True,
         checkpoint: PassCheckpoint | None = None) -> RunningTopK:
    """Score every query against every candidate in one pass; fills `scores_QN`; returns the running top-k.

    The candidates are cut into batches; process r takes batches r, r + world, ... and writes its
    columns of the shared memory map; the running top-k lists are merged across processes at the end.
    """
    union = np.arange(len(corpus)) if candidates is None else np.unique(np.concatenate([np.asarray(c, dtype=np.int64) for c in candidates]))
    sets = None if candidates is None else [np.unique(np.asarray(c, dtype=np.int64)) for c in candidates]
    batch_of = np.arange(len(union)) // config.batch_size  # batches r, r + world, ... belong to process r
    own_ids = union[batch_of % distributed.world() == distributed.rank()]
    loader = torch.utils.data.DataLoader(PackedDataset(corpus, own_ids), batch_size=config.batch_size,
                                         num_workers=config.num_workers, shuffle=False)
    names = [layer.name for layer in layers]
    scorer = BatchScorer(P, names, getattr(torch, config.compute_dtype))
    Q = scores_QN.shape[0]
    best = RunningTopK(Q, max(config.top_k, config.rerank))
    start = best.restore(checkpoint)
    most = -(-(-(-len(union) // config.batch_size)) // distributed.world())  # batches of the busiest process
    ids_of: dict[int, np.ndarray] = {}

    def record(finished: list) -> None:
        for done in finished:
            ids_C = ids_of.pop(done.index)
            total_QC = done.total(names).float()
            scores_QN[:, ids_C] = total_QC.numpy()
            member_QC = torch.ones_like(total_QC, dtype=torch.bool) if sets is None else \
                torch.from_numpy(np.stack([np.isin(ids_C, s) for s in sets]))
            best.update(total_QC, torch.from_numpy(ids_C), member_QC)

    for item in capture_pass(model, layers, loader, CausalLMObjective(), loss="real", desc="scan",
                             show_progress=show_progress, shard=False, start=start,
                             pad_to=most if distributed.lockstep() else None):
        ids_of[item.index] = own_ids[item.first : item.first + item.num_sequences]
        record(scorer.add(item))
        if checkpoint is not None and checkpoint.due(item.index + 1):
            record(scorer.flush())  # every batch before the progress mark is scored
            scores_QN.flush()  # and on disk
            best.save(checkpoint, item.index + 1)
    record(scorer.flush())
    if hasattr(scores_QN, "flush"):
        scores_QN.flush()
    parts = distributed.gather_by_key({distributed.rank(): (best.pos_values, best.pos_ids, best.neg_values, best.neg_ids)})
    merged = RunningTopK(Q, best.k)
    for key in sorted(parts):
        other = RunningTopK(Q, best.k)
        other.pos_values, other.pos_ids, other.neg_values, other.neg_ids = parts[key]
        merged.merge(other)
    return merged


# ----------------------------------------------------------------------------- 4. rescore


def rescore(model, layers: list[TrackedLayer], factors: Factors, tokenizer, encoded: list[EncodedQuery],
            corpus: PackedCorpus, best: RunningTopK, config: QueryConfig, full: dict | None,
            *, show_progress: bool = True) -> list[dict[int, dict]]:
    """{sequence: {score, per_layer, per_token}} for each query's final top-k, positive and negative.

    With reranking (full is None): each query's `rerank` best and worst scan candidates are scored
    again with full-rank query gradients (preconditioned a chunk of queries at a time, within a
    memory budget), and the top-k of those scores get the per-token split. Without: the scan's
    top-k get it, with the scan's query gradients `full`.
    """
    per_query = sum(layer.num_params for layer in layers)
    step = len(encoded) if full is not None else max(1, _DENSE_BUDGET_ELEMENTS // per_query)
    details: list[dict[int, dict]] = []
    for start in range(0, len(encoded), step):
        stop = min(len(encoded), start + step)
        rows = list(range(len(encoded))) if full is not None else list(range(start, stop))
        if full is not None:
            P = full
            finalists = {q: best.selected(q, config.top_k) for q in range(start, stop)}
        else:
            P = preconditioned_queries(model, layers, factors, tokenizer, encoded[start:stop], config, rank=None)
            rescored = _score_pairs(model, layers, P, rows, {q: best.selected(q, config.rerank) for q in range(start, stop)},
                                    corpus, config, per_token=False, show_progress=show_progress)
            finalists = {q: _finalists(scores, config.top_k) for q, scores in zip(range(start, stop), rescored)}
        details += _score_pairs(model, layers, P, rows, finalists, corpus, config, per_token=True,
                                show_progress=show_progress)
    return details


def _finalists(scores: dict[int, dict], k: int) -> list[int]:
    ranked = sorted(scores, key=lambda n: -scores[n]["score"])
    return list(dict.fromkeys(ranked[:k] + ranked[::-1][:k]))


def _score_pairs(model, layers, P: dict, rows: list[int], chosen: dict[int, list[int]], corpus: PackedCorpus,
                 config: QueryConfig, *, per_token: bool, show_progress: bool) -> list[dict[int, dict]]:
    """Scores (per layer, and per token when asked) of the sequences chosen[q] for each query q.

    rows[i] = the query of P's i-th row. Only the chosen (query, sequence) pairs are contracted:
    through per-sequence gradients (`pair_sequence_scores`), or token by token (`pair_token_scores`).
    """
    dtype = getattr(torch, config.compute_dtype)
    union = np.array(sorted({n for ids in chosen.values() for n in ids}), dtype=np.int64)
    loader = torch.utils.data.DataLoader(PackedDataset(corpus, union), batch_size=config.batch_size, shuffle=False)
    position = {q: i for i, q in enumerate(rows)}
    wanted_by = {}
    for q, ids in chosen.items():
        for n in ids:
            wanted_by.setdefault(n, []).append(q)
    local: dict = {}
    for item in capture_pass(model, layers, loader, CausalLMObjective(), loss="real",
                             desc="details" if per_token else "rescore", show_progress=show_progress):
        ids = union[item.first : item.first + item.num_sequences].tolist()
        pairs = [(q, b, n) for b, n in enumerate(ids) for q in wanted_by.get(n, [])]
        q_M = torch.tensor([position[q] for q, _, _ in pairs], dtype=torch.long)
        b_M = torch.tensor([b for _, b, _ in pairs], dtype=torch.long)
        per_layer, tokens_MT = {}, 0
        for layer in layers:
            g_BTO, a_BTI = item.grads[layer.name].to(dtype), item.acts[layer.name].to(dtype)
            if per_token:  # ∇log p = −∇L: the kernels ran on g = ∂L/∂s
                token_MT = -pair_token_scores(P[layer.name], g_BTO, a_BTI, q_M, b_M).double().cpu()
                per_layer[layer.name] = token_MT.sum(1)
                tokens_MT = tokens_MT + token_MT
            else:
                per_layer[layer.name] = -pair_sequence_scores(P[layer.name], g_BTO, a_BTI, q_M, b_M).double().cpu()
        for m, (q, _, n) in enumerate(pairs):
            entry = {"score": float(sum(value[m] for value in per_layer.values())),
                     "per_layer": {name: float(value[m]) for name, value in per_layer.items()}}
            if per_token:
                entry["per_token"] = tokens_MT[m, : int(corpus.lengths_N[n])].tolist()
            local[(q, n)] = entry
    merged = distributed.gather_by_key(local)
    return [{n: merged[(q, n)] for n in chosen[q] if (q, n) in merged} for q in sorted(chosen)]


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
            config: QueryConfig, num_candidates: int) -> dict:
    ranked = sorted(details.items(), key=lambda item: -item[1]["score"])
    positive = [item for item in ranked if item[1]["score"] > 0][: config.top_k]
    negative = [item for item in reversed(ranked) if item[1]["score"] < 0][: config.top_k]

    def hit(rank: int, n: int, detail: dict) -> dict:
        length = int(corpus.lengths_N[n])
        ids = [int(t) for t in corpus.tokens_NT[n, :length]]
        return {"rank": rank, "sequence": n, "score": detail["score"], "delta_logp": detail["score"] / num_train,
                "spurious": is_spurious(detail["per_token"], config.spurious_threshold),
                "per_layer": detail["per_layer"], "per_token": detail["per_token"],
                "tokens": [tokenizer.decode([t]) for t in ids], "text": tokenizer.decode(ids),
                "provenance": corpus.provenance[n]}

    return {"query": q, **resolved, "num_candidates": num_candidates,
            "top_positive": [hit(r + 1, n, d) for r, (n, d) in enumerate(positive)],
            "top_negative": [hit(r + 1, n, d) for r, (n, d) in enumerate(negative)]}


def _digest(value) -> str:
    import hashlib

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
        scores = np.memmap(path, dtype=np.float32, mode="w+", shape=(Q, N))
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
                "corpus_id": corpus.corpus_id, "num_train_sequences": factors.num_sequences,
                "layers": results.layer_names, "config": to_dict(config)}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    for progress in [tmp / "key.json", *tmp.glob("scan.rank*")]:
        progress.unlink()
    replace_directory(tmp, out)
