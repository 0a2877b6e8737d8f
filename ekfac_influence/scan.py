"""The query stage's passes: precondition the queries, scan the candidates, rescore the best.

    2. precondition: ∇f_q = Σ_r M_qr ∇log p(row r) (M = +1, or −1 for a contrast), P(∇f_q) per
       layer, kept as a rank-k factorisation (default k = 32) so hundreds of queries share one scan
    3. scan: one forward/backward per batch of candidates scores every query at once; all scores go
       to a memory-mapped Q × N float32 array as they come, and a running top-k is kept
    4. rescore: each query's best and worst scan candidates are scored again with full-rank query
       gradients, split by layer and by token; the final top-k come from these scores

Shapes: Q queries, R query rows, N training sequences, C candidates, B batch, T positions,
I in-features (+1 bias), O out-features, K rank, M (query, sequence) pairs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import distributed
from .audit import self_influence
from .config import QueryConfig, SelfInfluenceConfig
from .data import PackedCorpus, PackedDataset, pad_token_id
from .factors import Factors
from .influence import preconditioned_query_gradients, query_gradients, refined_inverse_product
from .model import TrackedLayer
from .objectives import CausalLMObjective
from .passes import capture_pass
from .precondition import LowRank, compress
from .query_inputs import EncodedQuery, collate_query_rows, query_rows
from .scores import BatchScorer, pair_sequence_scores, pair_token_scores
from .similarity import normalized, preconditioned_norms
from .storage import PassCheckpoint

_DENSE_BUDGET_ELEMENTS = 2**28  # full-rank query gradients held at once in the rescoring stage


def dense_rescoring_fits(layers: list[TrackedLayer], num_queries: int, config: QueryConfig) -> bool:
    """Whether every query's full-rank P(∇f_q) fits the rescoring's budget, so that the rank-k scan can take
    its truncation instead of preconditioning the queries a second time."""
    per_query = sum(layer.num_params for layer in layers)
    return config.rank is not None and config.rerank > 0 and num_queries * per_query <= _DENSE_BUDGET_ELEMENTS


def preconditioned_queries(model, layers: list[TrackedLayer], factors: Factors, tokenizer, encoded: list[EncodedQuery],
                           config: QueryConfig, *, rank: int | None, corpus: PackedCorpus | None = None,
                           checkpoint: PassCheckpoint | None = None,
                           show_progress: bool = False) -> dict[str, Tensor | LowRank]:
    """{layer: P(∇f_q) for every query}: groups of queries split among the processes, gathered on all.

    Groups hold at most `query_batch_size` rows, and fewer when that leaves a process without a group.
    With `config.refine_steps`, P(∇f_q) is refined toward the exact damped Gauss-Newton solve over
    batches of `corpus` (then truncated to rank k), resumable through `checkpoint`.
    """
    rows = sum(len(item.rows()) for item in encoded)
    per_group = max(1, min(config.query_batch_size, -(-rows // distributed.world())))
    groups = [query_rows(group) for group in _query_groups(encoded, per_group)]
    batches = [collate_query_rows(rows, pad_token_id(tokenizer)) for rows, _ in groups]
    dtype, combine = getattr(torch, config.compute_dtype), [M_QR for _, M_QR in groups]
    if config.refine_steps == 0:
        return preconditioned_query_gradients(model, layers, factors, batches, CausalLMObjective(), dtype=dtype,
                                              rank=rank, combine=combine, show_progress=False)
    if corpus is None:
        raise ValueError("refinement needs the training corpus (its batches give the Gauss-Newton products)")
    grads = query_gradients(model, layers, batches, CausalLMObjective(), combine=combine, show_progress=False)
    solved = refined_inverse_product(model, layers, factors, refinement_loader(corpus, config), CausalLMObjective(),
                                     grads, config, show_progress=show_progress, checkpoint=checkpoint)
    P = {name: value.to(dtype) for name, value in solved.items()}
    return P if rank is None else {name: compress(value, rank) for name, value in P.items()}


def refinement_loader(corpus: PackedCorpus, config: QueryConfig) -> torch.utils.data.DataLoader:
    """The training batches of every refinement step: all, or `refine_batches` spread evenly over the corpus."""
    size, total = config.batch_size, -(-len(corpus) // config.batch_size)
    chosen = range(total) if config.refine_batches is None else \
        sorted({round(i * total / config.refine_batches) for i in range(min(config.refine_batches, total))})
    ids = np.concatenate([np.arange(b * size, min(len(corpus), (b + 1) * size)) for b in chosen])
    return torch.utils.data.DataLoader(PackedDataset(corpus, ids), batch_size=size, shuffle=False)


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
         checkpoint: PassCheckpoint | None = None, self_influence_N: np.ndarray | None = None) -> RunningTopK:
    """Score every query against every candidate in one pass; fills `scores_QN`; returns the running top-k.

    The candidates are cut into batches; process r takes batches r, r + world, ... and writes its
    columns of the shared memory map; the running top-k lists are merged across processes at the end.
    self_influence_N: s(n) of every corpus sequence; the top-k lists then keep score / √s(n) (the order of both
    normalisations within a query), so the rescoring's pool holds the best normalised candidates. `scores_QN`
    keeps the raw scores either way.
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

    root_N = None if self_influence_N is None else torch.from_numpy(
        np.sqrt(np.maximum(np.asarray(self_influence_N, dtype=np.float64), 1e-300)))

    def record(finished: list) -> None:
        for done in finished:
            ids_C = ids_of.pop(done.index)
            total_QC = done.total(names).float()
            scores_QN[:, ids_C] = total_QC.numpy()
            member_QC = torch.ones_like(total_QC, dtype=torch.bool) if sets is None else \
                torch.from_numpy(np.stack([np.isin(ids_C, s) for s in sets]))
            kept_QC = total_QC if root_N is None else (total_QC.double() / root_N[torch.from_numpy(ids_C)]).float()
            best.update(kept_QC, torch.from_numpy(ids_C), member_QC)

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
            *, dense: dict | None = None, show_progress: bool = True) -> list[dict[int, dict]]:
    """{sequence: {score, per_layer, per_token}} for each query's final top-k, positive and negative.

    With reranking (full is None): each query's `rerank` best and worst scan candidates are scored
    again with full-rank query gradients (preconditioned a chunk of queries at a time, within a
    memory budget), and the top-k of those scores get the per-token split. Without: the scan's
    top-k get it, with the scan's query gradients `full`. dense: every query's full-rank P(∇f_q)
    when already computed (refined), used instead of preconditioning again.
    """
    per_query = sum(layer.num_params for layer in layers)
    step = len(encoded) if full is not None or dense is not None else max(1, _DENSE_BUDGET_ELEMENTS // per_query)
    kind = config.normalize
    count = config.rerank if kind == "none" else max(config.rerank, config.top_k)
    self_values = None if kind == "none" else \
        _self_influences(model, factors, corpus, {n for q in range(len(encoded)) for n in best.selected(q, count)},
                         config, show_progress=show_progress)
    details: list[dict[int, dict]] = []
    for start in range(0, len(encoded), step):
        stop = min(len(encoded), start + step)
        rows = list(range(len(encoded))) if full is not None else list(range(start, stop))
        if full is not None and kind == "none":
            P = full
            finalists = {q: best.selected(q, config.top_k) for q in range(start, stop)}
        else:
            P = full if full is not None else {name: value[start:stop] for name, value in dense.items()} \
                if dense is not None else preconditioned_queries(model, layers, factors, tokenizer, encoded[start:stop],
                                                                 config, rank=None)
            rescored = _score_pairs(model, layers, P, rows, {q: best.selected(q, count) for q in range(start, stop)},
                                    corpus, config, per_token=False, show_progress=show_progress)
            if kind != "none":
                query_norms = preconditioned_norms(P, factors) if kind == "cosine" else None
                for q, scores in zip(range(start, stop), rescored):
                    _normalize(scores, self_values, None if query_norms is None else float(query_norms[rows.index(q)]), kind)
            key = "score" if kind == "none" else "normalized_score"
            finalists = {q: _finalists(scores, config.top_k, key) for q, scores in zip(range(start, stop), rescored)}
        chunk = _score_pairs(model, layers, P, rows, finalists, corpus, config, per_token=True, show_progress=show_progress)
        if kind != "none":
            for scores, done in zip(rescored, chunk):
                for n, entry in done.items():
                    entry.update(normalized_score=scores[n]["normalized_score"], self_influence=scores[n]["self_influence"])
        details += chunk
    return details


def _self_influences(model, factors: Factors, corpus: PackedCorpus, ids: set[int], config: QueryConfig, *,
                     show_progress: bool) -> dict[int, float]:
    """{n: s(n)} of the candidate sequences whose normalised scores rank the final top-k (one pass over them)."""
    order = np.array(sorted(ids), dtype=np.int64)
    loader = torch.utils.data.DataLoader(PackedDataset(corpus, order), batch_size=config.batch_size, shuffle=False)
    result = self_influence(model, factors, loader, CausalLMObjective(),
                            SelfInfluenceConfig(batch_size=config.batch_size, compute_dtype=config.compute_dtype),
                            show_progress=show_progress)
    return dict(zip(order.tolist(), result.values.double().tolist()))


def _normalize(scores: dict[int, dict], self_values: dict[int, float], query_norm: float | None, kind: str) -> None:
    for n, entry in scores.items():
        entry["self_influence"] = self_values[n]
        entry["normalized_score"] = normalized(entry["score"], self_values[n], query_norm, kind)


def _finalists(scores: dict[int, dict], k: int, key: str = "score") -> list[int]:
    ranked = sorted(scores, key=lambda n: -scores[n][key])
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
