"""Score kernels: ⟨P(∇f_q), ∇log p(z_n)⟩ per layer, per token, from ā and g.

Shapes: Q queries, B sequences, T positions, N real (non-pad) tokens of a batch, I in-features
(+1 bias), O out-features, K rank. With D = ∇log p(z) = −∇L(z) = Σ_t d_t ā_tᵀ (d_t = −g_t):

    score(q, n)       = Σ_ℓ Σ_t d_tᵀ P_ℓ(q) ā_t
    per token t       = Σ_ℓ d_tᵀ P_ℓ(q) ā_t      (shown on input token t, which predicts t+1)
    rank-k P = U Vᵀ:    d_tᵀ P ā_t = Σ_k (u_kᵀ d_t)(v_kᵀ ā_t)

Three contraction forms, chosen per layer and batch by their multiply-adds (`contraction_costs`):

    "sequences"  the per-sequence gradient D_BOI, then one product with every dense P: B·T·O·I + Q·B·O·I
                 (T: the positions left after trimming those that are padding in every sequence)
    "tokens"     d_tᵀ (P ā_t) on the N real tokens only, packed:                    Q·N·O·I
    "rank"       Σ_k (u_kᵀ d_t)(v_kᵀ ā_t) on the N real tokens, for a rank-k P:     Q·N·K·(O + I)

Many queries sharing a pass favour "sequences"; one query, or a batch that is mostly padding, favours
"tokens"; per-token scores need a token form. A rank-k P is turned dense, once and for good, when a
dense form is cheaper and the dense queries fit in memory (`scoring_form`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .precondition import LowRank

_CHUNK_ELEMENTS = 2**26  # bound on intermediate tensors of the token-wise kernels
_DENSE_QUERY_ELEMENTS = 2**28  # a rank-k query set is expanded to dense only below this size
_GROUP_ELEMENTS = 2**26  # per-sequence gradients buffered before one product with every dense query gradient


def _query_chunks(Q: int, per_query: int):
    step = max(1, _CHUNK_ELEMENTS // max(per_query, 1))
    return [(start, min(Q, start + step)) for start in range(0, Q, step)]


def dense_sequence_scores(P_QOI: Tensor, d_BTO: Tensor, a_BTI: Tensor) -> Tensor:
    """score_QB via the per-sequence gradient D_BOI = Σ_t d_t ā_tᵀ."""
    D_BOI = torch.einsum("bto,bti->boi", d_BTO, a_BTI)
    return P_QOI.flatten(1) @ D_BOI.flatten(1).T


def dense_token_scores(P_QOI: Tensor, d_BTO: Tensor, a_BTI: Tensor) -> Tensor:
    """token_QBT = d_tᵀ P ā_t, chunked over queries."""
    B, T, O = d_BTO.shape
    out = []
    for start, stop in _query_chunks(P_QOI.shape[0], B * T * O):
        Pa_QBTO = torch.einsum("qoi,bti->qbto", P_QOI[start:stop], a_BTI)
        out.append(torch.einsum("qbto,bto->qbt", Pa_QBTO, d_BTO))
    return torch.cat(out)


def low_rank_token_scores(P: LowRank, d_BTO: Tensor, a_BTI: Tensor) -> Tensor:
    """token_QBT = Σ_k (u_kᵀ d_t)(v_kᵀ ā_t), chunked over queries."""
    B, T, _ = d_BTO.shape
    K = P.left_QOK.shape[-1]
    out = []
    for start, stop in _query_chunks(P.left_QOK.shape[0], B * T * K):
        du_QBTK = torch.einsum("bto,qok->qbtk", d_BTO, P.left_QOK[start:stop])
        av_QBTK = torch.einsum("bti,qik->qbtk", a_BTI, P.right_QIK[start:stop])
        out.append((du_QBTK * av_QBTK).sum(-1))
    return torch.cat(out)


def packed_token_scores(P: Tensor | LowRank, d_NO: Tensor, a_NI: Tensor) -> Tensor:
    """token_QN = d_nᵀ P ā_n of N packed (real) tokens: "tokens" for a dense P, "rank" for a rank-k one."""
    N = d_NO.shape[0]
    out = []
    if isinstance(P, LowRank):
        for start, stop in _query_chunks(P.left_QOK.shape[0], N * P.left_QOK.shape[-1]):
            du_QNK = torch.einsum("no,qok->qnk", d_NO, P.left_QOK[start:stop])
            av_QNK = torch.einsum("ni,qik->qnk", a_NI, P.right_QIK[start:stop])
            out.append((du_QNK * av_QNK).sum(-1))
    else:
        for start, stop in _query_chunks(P.shape[0], N * P.shape[1]):
            Pa_QNO = torch.einsum("qoi,ni->qno", P[start:stop], a_NI)
            out.append((Pa_QNO * d_NO).sum(-1))
    return torch.cat(out) if out else d_NO.new_zeros(0, N)


def real_positions(mask_BT: Tensor | None) -> Tensor | None:
    """Flat indices b·T + t of the real tokens (None: every position is real)."""
    return None if mask_BT is None else mask_BT.reshape(-1).nonzero().squeeze(1)


def trimmed(d_BTO: Tensor, a_BTI: Tensor, mask_BT: Tensor | None) -> tuple[Tensor, Tensor]:
    """d and ā without the leading and trailing positions that are padding in every sequence of the batch."""
    if mask_BT is None:
        return d_BTO, a_BTI
    used_T = mask_BT.any(0).nonzero()
    if len(used_T) == 0:
        return d_BTO[:, :0], a_BTI[:, :0]
    first, last = int(used_T[0]), int(used_T[-1]) + 1
    return d_BTO[:, first:last], a_BTI[:, first:last]


def contraction_costs(Q: int, B: int, T: int, N: int, O: int, I: int, K: int | None = None) -> dict[str, int]:
    """Multiply-adds of each form (module docstring) for Q queries against B sequences of T positions, N real tokens.

    K: the rank of a rank-k P (then "rank" is a choice; a dense P's forms are costed as if it were dense).
    """
    costs = {"sequences": B * T * O * I + Q * B * O * I, "tokens": Q * N * O * I}
    if K is not None:
        costs["rank"] = Q * N * K * (O + I)
    return costs


def choose_form(P: Tensor | LowRank, B: int, T: int, N: int, *, per_token: bool) -> str:
    """The cheapest form that applies: "rank" for a rank-k P; "tokens" or (without per-token scores) "sequences"."""
    if isinstance(P, LowRank):
        return "rank"
    Q, O, I = P.shape
    costs = contraction_costs(Q, B, T, N, O, I)
    if per_token:
        costs.pop("sequences")
    return min(costs, key=costs.get)


def layer_scores(P: Tensor | LowRank, d_BTO: Tensor, a_BTI: Tensor, *, per_token: bool, mask_BT: Tensor | None = None,
                 form: str | None = None) -> tuple[Tensor, Tensor | None]:
    """(score_QB, token_QBT or None) of one layer, in the cheapest contraction form (or the `form` given).

    mask_BT: 1 = real token (d and ā are zero elsewhere); the token forms skip the padding.
    """
    B, T, _ = d_BTO.shape
    flat_N = real_positions(mask_BT)
    N = B * T if flat_N is None else len(flat_N)
    form = form or choose_form(P, B, trimmed(d_BTO, a_BTI, mask_BT)[0].shape[1], N, per_token=per_token)
    if form == "sequences":
        if per_token or isinstance(P, LowRank):
            raise ValueError("the sequences form needs a dense P and gives no per-token scores")
        return dense_sequence_scores(P, *trimmed(d_BTO, a_BTI, mask_BT)), None
    if (form == "rank") != isinstance(P, LowRank):
        raise ValueError(f"form {form!r} does not apply to a {'rank-k' if isinstance(P, LowRank) else 'dense'} P")
    d_NO, a_NI = d_BTO.reshape(B * T, -1), a_BTI.reshape(B * T, -1)
    if flat_N is not None:
        d_NO, a_NI = d_NO[flat_N], a_NI[flat_N]
    token_QN = packed_token_scores(P, d_NO, a_NI)
    if flat_N is None:
        tokens_QBT = token_QN.view(-1, B, T)
        return tokens_QBT.sum(-1), tokens_QBT if per_token else None
    score_QB = token_QN.new_zeros(token_QN.shape[0], B).index_add_(1, flat_N // T, token_QN)
    if not per_token:
        return score_QB, None
    tokens_QBT = token_QN.new_zeros(token_QN.shape[0], B * T).index_copy_(1, flat_N, token_QN).view(-1, B, T)
    return score_QB, tokens_QBT


def pair_token_scores(P: Tensor | LowRank, d_BTO: Tensor, a_BTI: Tensor, q_M: Tensor, b_M: Tensor) -> Tensor:
    """token_MT = d_tᵀ P(q_m) ā_t of sequence b_m, for M chosen (query, sequence) pairs only.

    The detail of a few top sequences per query costs M·T·O·I (dense) or M·T·K·(O + I) (rank k)
    instead of the Q·B·T·O·I of scoring every query against every sequence of the batch.
    """
    B, T, O = d_BTO.shape
    width = P.left_QOK.shape[-1] if isinstance(P, LowRank) else O
    out = []
    for start, stop in _query_chunks(len(q_M), T * width):
        q, b = q_M[start:stop], b_M[start:stop]
        if isinstance(P, LowRank):
            du_MTK = torch.einsum("mto,mok->mtk", d_BTO[b], P.left_QOK[q])
            av_MTK = torch.einsum("mti,mik->mtk", a_BTI[b], P.right_QIK[q])
            out.append((du_MTK * av_MTK).sum(-1))
        else:
            Pa_MTO = torch.einsum("mti,moi->mto", a_BTI[b], P[q])
            out.append((Pa_MTO * d_BTO[b]).sum(-1))
    return torch.cat(out) if out else d_BTO.new_zeros(0, T)


def pair_sequence_scores(P: Tensor | LowRank, d_BTO: Tensor, a_BTI: Tensor, q_M: Tensor, b_M: Tensor) -> Tensor:
    """score_M = ⟨P(q_m), D_{b_m}⟩ through the per-sequence gradients D_BOI = Σ_t d_t ā_tᵀ (no token split)."""
    D_BOI = torch.einsum("bto,bti->boi", d_BTO, a_BTI)
    out = []
    for start, stop in _query_chunks(len(q_M), D_BOI[0].numel()):
        q, b = q_M[start:stop], b_M[start:stop]
        if isinstance(P, LowRank):
            out.append((torch.einsum("moi,mik->mok", D_BOI[b], P.right_QIK[q]) * P.left_QOK[q]).sum((1, 2)))
        else:
            out.append((P[q] * D_BOI[b]).sum((1, 2)))
    return torch.cat(out) if out else d_BTO.new_zeros(0)


def scoring_form(preconditioned: dict, name: str, shape_BTO, I: int, per_token: bool, N: int | None = None) -> Tensor | LowRank:
    """A rank-k query gradient is turned dense once, for good, when a dense form is cheaper and fits in memory."""
    P = preconditioned[name]
    if not isinstance(P, LowRank) or per_token:
        return P
    B, T, O = shape_BTO
    Q, _, K = P.left_QOK.shape
    costs = contraction_costs(Q, B, T, B * T if N is None else N, O, I, K)
    if min(costs, key=costs.get) != "rank" and Q * O * I <= _DENSE_QUERY_ELEMENTS:
        preconditioned[name] = P = P.dense()
    return P


@dataclass
class BatchScores:
    """One batch's scores against every query (positive = helpful): per layer [Q, B], per token [Q, B, T]."""

    index: int
    per_layer: dict[str, Tensor]
    tokens: Tensor | None = None

    def total(self, names: Sequence[str]) -> Tensor:
        """Σ over layers, always in the order of `names` (the same rounding however batches were grouped)."""
        return sum(self.per_layer[name] for name in names)


class BatchScorer:
    """Scores every captured batch against all query gradients, layer by layer, in the cheapest order.

    Dense query gradients meet the per-sequence gradients D_BOI of several batches in one product
    (up to _GROUP_ELEMENTS buffered): with small batches, [Q, O·I] × [O·I, B] is bound by reading P.
    So `add` returns the batches whose scores are complete (none, one or several) and `flush`
    completes the rest. Layers whose D_BOI is large (big models) are scored batch by batch.
    """

    def __init__(self, preconditioned: dict, names: list[str], dtype: torch.dtype, *, per_token: bool = False):
        self.P, self.names, self.dtype, self.per_token = preconditioned, names, dtype, per_token
        self.group = _Group()
        self.waiting: dict[int, BatchScores] = {}

    def add(self, item) -> list[BatchScores]:
        """Score a `passes.BatchCapture`; the sign flips here: ∇log p(z) = −∇L(z), the kernels ran on g = ∂L/∂s."""
        per_layer, tokens, grouped = {}, None, {}
        mask_BT = getattr(item, "mask", None)
        N = item.num_tokens
        for name in self.names:
            g_BTO, a_BTI = item.grads[name].to(self.dtype), item.acts[name].to(self.dtype)
            trimmed_BTO, trimmed_BTI = trimmed(g_BTO, a_BTI, mask_BT)
            P = scoring_form(self.P, name, trimmed_BTO.shape, a_BTI.shape[-1], self.per_token, N)
            form = choose_form(P, g_BTO.shape[0], trimmed_BTO.shape[1], N, per_token=self.per_token)
            if form == "sequences" and _groupable(trimmed_BTO, trimmed_BTI, len(self.names)):
                grouped[name] = (trimmed_BTO, trimmed_BTI)
                continue
            score_QB, tokens_QBT = layer_scores(P, g_BTO, a_BTI, per_token=self.per_token, mask_BT=mask_BT, form=form)
            per_layer[name] = -score_QB.cpu()
            if tokens_QBT is not None:
                tokens = -tokens_QBT if tokens is None else tokens - tokens_QBT
        scores = BatchScores(item.index, per_layer, None if tokens is None else tokens.cpu())
        if not grouped:
            return [scores]
        done = [] if self.group.fits(grouped) else self.flush()
        self.waiting[item.index] = scores
        self.group.add(item.index, grouped)
        if self.group.elements() >= _GROUP_ELEMENTS:
            done += self.flush()
        return done

    def flush(self) -> list[BatchScores]:
        """score_QB = −⟨P_q, D_b⟩ for every buffered batch, one product per layer; returns them in order."""
        _score_group(self.group, self.P, self.waiting)
        done = [self.waiting.pop(index) for index in sorted(self.waiting)]
        return done


def _groupable(g_BTO: Tensor, a_BTI: Tensor, num_layers: int) -> bool:
    """Buffer only small per-sequence gradients: a batch's, over every layer, within 1/4 of the budget."""
    return g_BTO.shape[0] * g_BTO.shape[-1] * a_BTI.shape[-1] * num_layers <= _GROUP_ELEMENTS // 4


class _Group:
    """Per-sequence gradients D_BOI of consecutive batches, written in place into one [G, O, I] buffer per layer.

    The buffers are allocated once, at the size of a full group, and kept from group to group.
    """

    def __init__(self):
        self.buffers: dict[str, Tensor] = {}
        self.batches: list[tuple[int, int]] = []  # (batch index, sequences)
        self.count = 0

    def __len__(self) -> int:
        return len(self.batches)

    def fits(self, grouped: dict) -> bool:
        """Whether this batch's layers and dtype match the group's (they do, except after a change of set-up)."""
        return not self.batches or (set(grouped) == set(self.buffers)
                                    and all(self.buffers[n].dtype == g.dtype for n, (g, _) in grouped.items()))

    def add(self, index: int, grouped: dict[str, tuple[Tensor, Tensor]]) -> None:
        if not self.batches and set(grouped) != set(self.buffers):
            self.buffers = {}
        B = next(iter(grouped.values()))[0].shape[0]
        per_sequence = sum(g.shape[-1] * a.shape[-1] for g, a in grouped.values())
        capacity = -(-_GROUP_ELEMENTS // per_sequence) + B  # a group is flushed once it holds _GROUP_ELEMENTS
        for name, (g_BTO, a_BTI) in grouped.items():
            buffer = self.buffers.get(name)
            if buffer is None or buffer.shape[0] < self.count + B or buffer.dtype != g_BTO.dtype:
                grown = g_BTO.new_empty(max(self.count + B, capacity), g_BTO.shape[-1], a_BTI.shape[-1])
                if buffer is not None and self.count:
                    grown[: self.count] = buffer[: self.count]
                self.buffers[name] = buffer = grown
            torch.bmm(g_BTO.transpose(1, 2), a_BTI, out=buffer[self.count : self.count + B])
        self.batches.append((index, B))
        self.count += B

    def elements(self) -> int:
        return sum(self.count * D.shape[1] * D.shape[2] for D in self.buffers.values())

    def clear(self) -> None:
        self.batches, self.count = [], 0


def _score_group(group: _Group, preconditioned: dict, waiting: dict[int, BatchScores]) -> None:
    """Fill in the grouped layers' scores of the group's batches; empties the group."""
    if not group.batches:
        return
    sizes = [size for _, size in group.batches]
    for name, buffer in group.buffers.items():
        D_GOI = buffer[: group.count]
        score_QG = -(preconditioned[name].flatten(1) @ D_GOI.flatten(1).T).cpu()
        for (index, _), score_QB in zip(group.batches, score_QG.split(sizes, dim=1)):
            waiting[index].per_layer[name] = score_QB
    group.clear()


@dataclass
class ScoreResult:
    """Influence of every training sequence on every query; positive = helpful.

    scores: [Q, N]; per_layer: {layer: [Q, N]}; per_token: [Q, N, T] (zero on padding).
    `num_train_sequences` is N, the size of the training set (ScoreConfig.train_size, else the
    sequences scored): delta_logp = score / N estimates the change of log p(c | p) from adding one copy
    of the sequence to the training set.
    """

    scores: Tensor
    per_layer: dict[str, Tensor] | None = None
    per_token: Tensor | None = None
    num_train_sequences: int = 0

    @property
    def delta_logp(self) -> Tensor:
        return self.scores / max(self.num_train_sequences, 1)


@dataclass
class TopK:
    """Per query: the k most positive (helpful) and k most negative (harmful) sequences.

    A side holds only scores of its own sign: with fewer than k of them, the slots left over hold
    index −1 and score NaN (a zero or NaN score is on neither side).
    """

    positive_indices: Tensor  # [Q, k]
    positive_scores: Tensor
    negative_indices: Tensor
    negative_scores: Tensor


def top_k(result: ScoreResult | Tensor, k: int) -> TopK:
    """The k highest scores > 0 and the k lowest scores < 0 of each query, [Q, k] each."""
    scores_QN = result.scores if isinstance(result, ScoreResult) else result
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = min(k, scores_QN.shape[1])
    infinity = torch.tensor(float("inf"), dtype=scores_QN.dtype, device=scores_QN.device)
    positive = torch.topk(torch.where(scores_QN > 0, scores_QN, -infinity), k, dim=1)
    negative = torch.topk(torch.where(scores_QN < 0, scores_QN, infinity), k, dim=1, largest=False)

    def side(found, kept_QK: Tensor) -> tuple[Tensor, Tensor]:
        return found.indices.masked_fill(~kept_QK, -1), found.values.masked_fill(~kept_QK, float("nan"))

    return TopK(*side(positive, positive.values > 0), *side(negative, negative.values < 0))
