"""Score kernels: ⟨P(∇f_q), ∇log p(z_n)⟩ per layer, per token, from ā and g.

Shapes: Q queries, B sequences, T positions, I in-features (+1 bias), O out-features, K rank.
With D = ∇log p(z) = −∇L(z) = Σ_t d_t ā_tᵀ (d_t = −g_t):

    score(q, n)       = Σ_ℓ Σ_t d_tᵀ P_ℓ(q) ā_t
    per token t       = Σ_ℓ d_tᵀ P_ℓ(q) ā_t      (shown on input token t, which predicts t+1)
    rank-k P = U Vᵀ:    d_tᵀ P ā_t = Σ_k (u_kᵀ d_t)(v_kᵀ ā_t)

Without per-token scores a dense P goes through the per-sequence O × I gradient (B·T·O·I + Q·B·O·I
flops); per-token scores contract token by token (Q·B·T·O·I); a rank-k P contracts token by token
(Q·B·T·K·(O + I)). The caller turns a rank-k P dense when that is cheaper and fits in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .precondition import LowRank

_CHUNK_ELEMENTS = 2**26  # bound on intermediate tensors of the token-wise kernels


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


def layer_scores(P: Tensor | LowRank, d_BTO: Tensor, a_BTI: Tensor, *, per_token: bool) -> tuple[Tensor, Tensor | None]:
    """(score_QB, token_QBT or None) of one layer, in the cheapest contraction order."""
    if isinstance(P, LowRank):
        tokens_QBT = low_rank_token_scores(P, d_BTO, a_BTI)
        return tokens_QBT.sum(-1), tokens_QBT if per_token else None
    if per_token:
        tokens_QBT = dense_token_scores(P, d_BTO, a_BTI)
        return tokens_QBT.sum(-1), tokens_QBT
    return dense_sequence_scores(P, d_BTO, a_BTI), None


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


@dataclass
class ScoreResult:
    """Influence of every training sequence on every query; positive = helpful.

    scores: [Q, N]; per_layer: {layer: [Q, N]}; per_token: [Q, N, T] (zero on padding).
    `num_train_sequences` is the N over which G was averaged: delta_logp = score / N estimates the
    change of log p(c | p) from adding one copy of the sequence to the training set.
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
    """Per query: the k most positive (helpful) and k most negative (harmful) sequences."""

    positive_indices: Tensor  # [Q, k]
    positive_scores: Tensor
    negative_indices: Tensor
    negative_scores: Tensor


def top_k(result: ScoreResult | Tensor, k: int) -> TopK:
    scores_QN = result.scores if isinstance(result, ScoreResult) else result
    k = min(k, scores_QN.shape[1])
    positive = torch.topk(scores_QN, k, dim=1)
    negative = torch.topk(scores_QN, k, dim=1, largest=False)
    return TopK(positive.indices, positive.values, negative.indices, negative.values)
