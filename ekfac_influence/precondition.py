"""Inverse-curvature products P(V) = (G + λI)⁻¹ V and rank-k compression of the result.

Shapes: Q queries, O out-features, I in-features (+1 bias), K rank, P tracked parameters.

    ekfac/kfac: P(V) = Q_S [ (Q_Sᵀ V Q_A) ⊘ (Λ + λ) ] Q_Aᵀ
    diagonal:   P(V) = V ⊘ (Λ + λ)
    identity:   P(V) = V
    exact:      vec P(V) = (G + diag(λ))⁻¹ vec V, G dense over all tracked layers (layers coupled)
LiSSA needs passes over data and lives in `reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .factors import Factors, LayerFactors


def eigenbasis_inverse_product(V_QOI: Tensor, QS_OO: Tensor, QA_II: Tensor, lambda_OI: Tensor, damping: float) -> Tensor:
    """Q_S [ (Q_Sᵀ V Q_A) ⊘ (Λ + λ) ] Q_Aᵀ for each query."""
    rotated_QOI = QS_OO.T @ V_QOI @ QA_II
    return QS_OO @ (rotated_QOI / (lambda_OI + damping)) @ QA_II.T


def layer_inverse_product(V_QOI: Tensor, factors: LayerFactors, strategy: str) -> Tensor:
    if strategy == "identity":
        return V_QOI
    if strategy == "diagonal":
        return V_QOI / (factors.lambda_OI + factors.damping)
    if strategy in ("kfac", "ekfac"):
        return eigenbasis_inverse_product(V_QOI, factors.QS_OO, factors.QA_II, factors.lambda_OI, factors.damping)
    raise ValueError(f"strategy {strategy!r} has no per-layer inverse")


def exact_inverse_product(grads: dict[str, Tensor], factors: Factors) -> dict[str, Tensor]:
    """Solve (G + diag(λ)) X = V with the dense Gauss-Newton, in float64."""
    names = factors.layer_names
    V_QP = torch.cat([grads[name].reshape(grads[name].shape[0], -1) for name in names], dim=1)
    damping_P = torch.cat([torch.full((l.out_dim * l.in_dim,), l.damping, dtype=torch.float64) for l in factors.layers])
    ggn_PP = factors.ggn_PP.to(device=V_QP.device, dtype=torch.float64)
    damped_PP = ggn_PP + torch.diag(damping_P.to(V_QP.device))
    X_QP = torch.linalg.solve(damped_PP, V_QP.double().T).T.to(V_QP.dtype)
    out, offset = {}, 0
    for layer in factors.layers:
        size = layer.out_dim * layer.in_dim
        out[layer.name] = X_QP[:, offset : offset + size].reshape(-1, layer.out_dim, layer.in_dim)
        offset += size
    return out


def precondition(grads: dict[str, Tensor], factors: Factors, dtype: torch.dtype = torch.float32,
                 rank: int | None = None) -> dict[str, "Tensor | LowRank"]:
    """P(∇f) for every layer. grads: {layer: V_QOI}. With `rank`, each P is kept as its rank-k truncation."""
    if factors.strategy == "exact":
        out = {name: value.to(dtype) for name, value in exact_inverse_product(grads, factors).items()}
        return out if rank is None else {name: compress(P, rank) for name, P in out.items()}
    out = {}
    for layer in factors.layers:
        V_QOI = grads[layer.name].to(dtype)
        moved = layer.to(dtype, V_QOI.device)
        if rank is not None and factors.strategy in ("kfac", "ekfac"):
            out[layer.name] = eigenbasis_low_rank(V_QOI, moved.QS_OO, moved.QA_II, moved.lambda_OI, moved.damping, rank)
        else:
            P_QOI = layer_inverse_product(V_QOI, moved, factors.strategy)
            out[layer.name] = P_QOI if rank is None else compress(P_QOI, rank)
    return out


def eigenbasis_low_rank(V_QOI: Tensor, QS_OO: Tensor, QA_II: Tensor, lambda_OI: Tensor, damping: float,
                        rank: int) -> "Tensor | LowRank":
    """The rank-k truncation of P = Q_S X Q_Aᵀ, X = (Q_Sᵀ V Q_A) ⊘ (Λ + λ), without forming P.

    Orthogonal factors leave singular values alone: if X ≈ U_k Σ_k V_kᵀ then P ≈ (Q_S U_k Σ_k)(Q_A V_k)ᵀ
    is P's own best rank-k approximation. Saves the rotation back (O²·I + O·I² per query) for O²·k + I²·k.
    """
    X_QOI = (QS_OO.T @ V_QOI @ QA_II) / (lambda_OI + damping)
    low = compress(X_QOI, rank)
    if not isinstance(low, LowRank):  # k ≥ min(O, I): nothing to truncate
        return QS_OO @ low @ QA_II.T
    return LowRank(QS_OO @ low.left_QOK, QA_II @ low.right_QIK)


@dataclass
class LowRank:
    """P ≈ left_QOK @ right_QIKᵀ (the singular values folded into one of the two)."""

    left_QOK: Tensor
    right_QIK: Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.left_QOK.shape[0], self.left_QOK.shape[1], self.right_QIK.shape[1]

    def dense(self) -> Tensor:
        return self.left_QOK @ self.right_QIK.transpose(1, 2)

    def to(self, *args, **kwargs) -> "LowRank":
        return LowRank(self.left_QOK.to(*args, **kwargs), self.right_QIK.to(*args, **kwargs))


def compress(P_QOI: Tensor, rank: int) -> LowRank | Tensor:
    """Rank-k truncation U_k diag(σ_k) V_kᵀ of each query's O × I matrix (the best rank-k approximation).

    Computed from the eigendecomposition of the smaller Gram matrix (PᵀP when I ≤ O): V_k = its top-k
    eigenvectors, P V_k = U_k diag(σ_k). Much faster than a batched SVD on CPU. It works in float64
    for float64 input and in float32 otherwise, at half the time: on the engine benchmark's 1,536
    query gradients (in random eigenbases, docs/benchmarks.md) the float32 truncation error ‖P − P_k‖
    exceeded the float64 one by at most 2·10⁻⁴ ‖P‖, against a median of 3·10⁻² ‖P‖ at rank 32.
    Returns the input unchanged when k ≥ min(O, I).
    """
    Q, O, I = P_QOI.shape
    if rank >= min(O, I):
        return P_QOI
    P64 = P_QOI if P_QOI.dtype == torch.float64 else P_QOI.float()
    # each query scaled to max |entry| = 1 for the Gram matrix (its squares neither overflow nor underflow)
    scaled = P64 / P64.abs().amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(P64.dtype).tiny)
    if I <= O:
        _, V_QII = torch.linalg.eigh(scaled.transpose(1, 2) @ scaled)
        right_QIK = V_QII[:, :, -rank:].flip(-1)
        left_QOK = P64 @ right_QIK
    else:
        _, U_QOO = torch.linalg.eigh(scaled @ scaled.transpose(1, 2))
        left_QOK = U_QOO[:, :, -rank:].flip(-1)
        right_QIK = P64.transpose(1, 2) @ left_QOK
    return LowRank(left_QOK.to(P_QOI.dtype).contiguous(), right_QIK.to(P_QOI.dtype).contiguous())
