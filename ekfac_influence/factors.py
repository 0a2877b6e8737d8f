"""Curvature factors: covariances, eigendecomposition, eigenvalue correction, damping.

Shapes: B sequences, T positions, I in-features (+1 bias column), O out-features.
For a tracked layer with inputs ā_t and output gradients g_t of the sampled-label loss:

    A = E_tokens[ā āᵀ]   (I × I)        S = E_tokens[g gᵀ]   (O × O)
    A = Q_A Λ_A Q_Aᵀ,  S = Q_S Λ_S Q_Sᵀ   (eigh in float64 of the symmetrised matrices)
    DW_n = Σ_t g_{n,t} ā_{n,t}ᵀ            (O × I, one sequence)
    ekfac:    Λ = E_sequences[(Q_Sᵀ DW_n Q_A)²]
    kfac:     Λ = T̄ · Λ_S ⊗ Λ_A   (T̄ = tokens per sequence, so both estimate the per-sequence G)
    diagonal: Λ = E_sequences[DW_n²]
    damping:  λ = damping_factor × mean(Λ), or a fixed value

This module holds the math and the containers; the passes over data live in `pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import FactorConfig


def covariance(x_NX: Tensor) -> Tensor:
    """Σ_n x_n x_nᵀ in float64 (products in the input's precision, at least float32)."""
    x_NX = x_NX if x_NX.dtype == torch.float64 else x_NX.float()
    return (x_NX.T @ x_NX).double()


def block_slices(size: int, blocks: int) -> list[slice]:
    """`blocks` contiguous slices of 0..size, as even as possible (one slice when blocks == 1)."""
    bounds = [round(i * size / blocks) for i in range(blocks + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def factor_blocks(size: int, config: FactorConfig) -> int:
    """How many diagonal blocks a factor of this size is split into (the paper's 52B setting: 2)."""
    return config.blocks if size >= config.block_min_dim else 1


def blocked_covariance(x_NX: Tensor, blocks: int) -> Tensor:
    """Σ_n x_n x_nᵀ restricted to its diagonal blocks (zeros elsewhere): blocks× fewer flops."""
    if blocks == 1:
        return covariance(x_NX)
    out_XX = torch.zeros(x_NX.shape[1], x_NX.shape[1], dtype=torch.float64, device=x_NX.device)
    for block in block_slices(x_NX.shape[1], blocks):
        out_XX[block, block] = covariance(x_NX[:, block])
    return out_XX


def eigendecompose(cov_XX: Tensor, blocks: int = 1) -> tuple[Tensor, Tensor]:
    """(eigenvalues_X, eigenvectors_XX) of the symmetrised matrix, in float64, eigenvalues ≥ 0.

    With blocks > 1 the matrix is taken as block-diagonal: one eigh per block (blocks² fewer flops),
    and Q is block-diagonal (stored dense here).
    """
    cov_XX = cov_XX.double()
    if blocks > 1:
        Q_XX = torch.zeros_like(cov_XX)
        values = []
        for block in block_slices(cov_XX.shape[0], blocks):
            values_b, Q_XX[block, block] = eigendecompose(cov_XX[block, block])
            values.append(values_b)
        return torch.cat(values), Q_XX
    eigenvalues_X, eigenvectors_XX = torch.linalg.eigh((cov_XX + cov_XX.T) / 2)
    return eigenvalues_X.clamp_min(0), eigenvectors_XX.contiguous()  # row-major, as stored: same sums after a reload


def sequence_gradients(g_BTO: Tensor, a_BTI: Tensor) -> Tensor:
    """DW_BOI = Σ_t g_t ā_tᵀ per sequence."""
    return torch.einsum("bto,bti->boi", g_BTO, a_BTI)


def rotation_order(T: int, O: int, I: int) -> str:
    """'tokens' when rotating each token (T·(O² + I²) flops) beats rotating DW (O·I·(O + I))."""
    return "tokens" if T * (O * O + I * I) < O * I * (O + I) else "sequences"


def rotated_sequence_gradients(g_BTO: Tensor, a_BTI: Tensor, QS_OO: Tensor, QA_II: Tensor, order: str = "auto") -> Tensor:
    """Q_Sᵀ DW_n Q_A for every sequence of the batch, [B, O, I], in the cheaper contraction order."""
    B, T, O = g_BTO.shape
    I = a_BTI.shape[-1]
    if order == "auto":
        order = rotation_order(T, O, I)
    if order == "tokens":
        return sequence_gradients(g_BTO @ QS_OO, a_BTI @ QA_II)
    return QS_OO.T @ sequence_gradients(g_BTO, a_BTI) @ QA_II


def damping_for(lambda_OI: Tensor, config: FactorConfig) -> float:
    if config.damping is not None:
        return float(config.damping)
    return float(config.damping_factor * lambda_OI.double().mean())


@dataclass
class LayerFactors:
    """Everything the preconditioner of one layer needs. Unused fields stay None."""

    name: str
    out_dim: int
    in_dim: int
    damping: float = 0.0
    A_II: Tensor | None = None  # activation covariance (mean over tokens)
    S_OO: Tensor | None = None  # output-gradient covariance (mean over tokens)
    QA_II: Tensor | None = None
    QS_OO: Tensor | None = None
    eigA_I: Tensor | None = None
    eigS_O: Tensor | None = None
    lambda_OI: Tensor | None = None  # eigenvalues of G's block in the (Q_S ⊗ Q_A) basis, or its diagonal

    TENSORS = ("A_II", "S_OO", "QA_II", "QS_OO", "eigA_I", "eigS_O", "lambda_OI")

    def tensors(self) -> dict[str, Tensor]:
        return {key: getattr(self, key) for key in self.TENSORS if getattr(self, key) is not None}

    def to(self, dtype: torch.dtype, device=None) -> "LayerFactors":
        moved = {key: value.to(device=device, dtype=dtype) for key, value in self.tensors().items()}
        return LayerFactors(self.name, self.out_dim, self.in_dim, self.damping, **moved)


@dataclass
class Factors:
    """Fitted curvature for a set of tracked layers of one model.

    `ggn_PP` (exact strategy) is the dense Gauss-Newton over all tracked parameters, ordered layer by
    layer, each layer's O × I gradient flattened row-major. `lissa_scale` is used by LiSSA.
    """

    strategy: str
    layers: list[LayerFactors]
    fingerprint: str
    config: FactorConfig
    num_sequences: int
    num_tokens: int
    ggn_PP: Tensor | None = None
    lissa_scale: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def layer(self, name: str) -> LayerFactors:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no factors for layer {name!r}; fitted layers: {', '.join(self.layer_names)}")

    def save(self, path, *, overwrite: bool = False) -> None:
        from .storage import save_factors

        save_factors(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path, *, model=None) -> "Factors":
        """Load factors; with `model`, refuse factors fitted for another model or other layers."""
        from .storage import load_factors

        factors = load_factors(path)
        if model is not None:
            from .pipeline import check_factors_match

            check_factors_match(factors, model)
        return factors
