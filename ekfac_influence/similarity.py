"""Training sequences side by side under P = (G + λI)⁻¹: whitened gradients, their cosines, near-duplicate groups
and the normalised query rankings (docs/design.md §1).

Shapes: C candidates, D whitened features, N training sequences, k² sketch features, Q queries.
W_n = P^{1/2} DW_n has ‖W_n‖² = s(n), the self-influence of `audit`, and cos(n, m) = ⟨W_n, W_m⟩ / (‖W_n‖ ‖W_m‖)
finds sequences whose gradients are almost parallel. Over a whole corpus the cosines are read from the k × k
sketches the self-influence pass keeps (`audit` module docstring); `whitened_gradients` gives W of a few
sequences exactly. RelatIF (Barshan et al., 2020) and the cosine form divide a query's score by √s(n) and by
√s(n) · ‖P^{1/2}∇f_q‖.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from . import distributed
from .audit import STRATEGIES, exact_whitened, layer_whitening, seeded
from .factors import Factors, check_factors_match, sequence_gradients
from .objectives import Objective
from .passes import BatchCapture, capture_pass, evaluation_mode

_SKETCH = 256  # whitened_gradients: a layer wider than _SKETCH² features is sketched to _SKETCH × _SKETCH


def whitened_gradients(model: nn.Module, factors: Factors, batches: Iterable, objective: Objective, *,
                       dtype: torch.dtype = torch.float32, show_progress: bool = False) -> Tensor:
    """W_CD = P^{1/2} DW_n of every sequence of `batches`, flattened over layers, in data order (‖W_n‖² = s(n)).

    A layer wider than 256² features is sketched: W ↦ Ω_O W Ω_I with seeded Gaussian Ω (entries of
    variance 1/256), which keeps inner products in expectation, so the [C, D] matrix stays small.
    """
    layers = check_factors_match(factors, model)
    if factors.strategy not in STRATEGIES:
        raise ValueError(f"near-duplicates need one of the strategies {', '.join(STRATEGIES)}, not {factors.strategy!r}")
    local = {}
    with evaluation_mode(model):
        for item in capture_pass(model, layers, batches, objective, loss="real", desc="whitened gradients",
                                 show_progress=show_progress):
            local[item.index] = _whitened_batch(item, factors, dtype)
    merged = distributed.gather_by_key(local)
    return torch.cat([merged[i] for i in sorted(merged)])


def _whitened_batch(item: BatchCapture, factors: Factors, dtype: torch.dtype) -> Tensor:
    names = factors.layer_names
    grads = {n: item.grads[n].to(dtype) for n in names}
    acts = {n: item.acts[n].to(dtype) for n in names}
    if factors.strategy == "exact":
        return exact_whitened({n: sequence_gradients(grads[n], acts[n]) for n in names}, factors).to(dtype).cpu()
    parts = []
    for layer in factors.layers:
        moved = layer.to(dtype, grads[layer.name].device)
        R_BOI, scale_OI, _ = layer_whitening(grads[layer.name], acts[layer.name], moved, factors.strategy)
        W_BOI = R_BOI if scale_OI is None else R_BOI * scale_OI.sqrt()
        parts.append(_sketched(W_BOI, layer.name).flatten(1).cpu())
    return torch.cat(parts, 1)


def _sketched(W_BOI: Tensor, name: str) -> Tensor:
    B, O, I = W_BOI.shape
    if O * I <= _SKETCH * _SKETCH:
        return W_BOI
    generator = seeded(name)
    omega_KO = torch.randn(_SKETCH, O, generator=generator, dtype=torch.float64) / _SKETCH**0.5
    omega_IK = torch.randn(I, _SKETCH, generator=generator, dtype=torch.float64) / _SKETCH**0.5
    return omega_KO.to(W_BOI) @ W_BOI @ omega_IK.to(W_BOI)


def cosine_matrix(W_CD: Tensor) -> Tensor:
    """cos_CC = ⟨W_n, W_m⟩ / (‖W_n‖ ‖W_m‖), in float64."""
    W_CD = W_CD.double()
    unit_CD = W_CD / W_CD.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return unit_CD @ unit_CD.T


def duplicate_groups(cos_CC: Tensor, threshold: float) -> list[list[int]]:
    """Connected groups (union-find over the pairs with cos ≥ threshold) of two or more; largest first."""
    return groups_of_pairs(cos_CC.shape[0], torch.nonzero(torch.triu(cos_CC >= threshold, diagonal=1)).tolist())


def near_duplicate_groups(sketch_NK: Tensor, threshold: float, *, chunk: int = 4096) -> list[list[int]]:
    """`duplicate_groups` over the whole corpus from the sketches (module docstring), chunk × N cosines at a time."""
    unit_NK = sketch_NK.float() / sketch_NK.float().norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    pairs = []
    for start in range(0, len(unit_NK), chunk):
        cos_CN = unit_NK[start : start + chunk] @ unit_NK.T
        i_M, j_M = torch.nonzero(cos_CN >= threshold, as_tuple=True)
        i_M = i_M + start
        keep = j_M > i_M
        pairs += torch.stack([i_M[keep], j_M[keep]], 1).tolist()
    return groups_of_pairs(len(unit_NK), pairs)


def sketched_cosines(sketch_NK: Tensor, members: list[int]) -> Tensor:
    """cos_CC of the members' sketches, in float64 (the numbers behind a group)."""
    return cosine_matrix(sketch_NK[members])


def joint_self_influence(sketch_NK: Tensor, values_N: Tensor, members: list[int], *, chunk: int = 4096) -> float:
    """s(G) = ‖Σ_{n∈G} W_n‖² = ∇L_Gᵀ (G + λI)⁻¹ ∇L_G, L_G the group's summed loss: the self-influence of the
    group taken as one, the first-order rise of its log-likelihood from training on all of it (Koh et al., 2019,
    on group effects). A memorised passage has a small s(n) each time it occurs, but k copies pull together:
    k identical sequences have s(G) = k² s(n).

    Read from the pass's sketches: s(G) = Σ_{n,m∈G} cos(n, m) √(s(n) s(m)) with the exact s(n) (`values_N`) and
    the sketched cosines, so it is off by Σ_{n≠m} δcos(n, m) √(s(n) s(m)), δcos a sketched cosine's error (the
    `audit` module docstring: about (1 − cos²)/k, small for near-duplicates); a sequence whose sketch is zero adds
    nothing. In float64, `chunk` members at a time (a group can hold a large part of the corpus).
    """
    values_N = torch.as_tensor(values_N, dtype=torch.float64)
    total_K = torch.zeros(sketch_NK.shape[1], dtype=torch.float64)
    for start in range(0, len(members), chunk):
        index = torch.as_tensor(members[start : start + chunk], dtype=torch.long)
        sketch_CK = sketch_NK[index].double()
        norms_C = sketch_CK.norm(dim=1, keepdim=True)
        unit_CK = torch.where(norms_C > 0, sketch_CK / norms_C.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        total_K += (values_N[index].clamp_min(0).sqrt()[:, None] * unit_CK).sum(0)
    return float((total_K**2).sum())


def groups_of_pairs(num: int, pairs: Iterable) -> list[list[int]]:
    """Connected groups (union-find) of `num` items joined by `pairs`, two or more members; largest first."""
    parent = list(range(num))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(parent)):
        groups.setdefault(root(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


# ----------------------------------------------------------------------------- normalised rankings


def preconditioned_norms(P: dict[str, Tensor], factors: Factors) -> Tensor:
    """‖P^{1/2} v_q‖² = ⟨P(v_q), v_q⟩ per query, from x = P(v) alone (v = (G + λ) x), [Q] float64.

    kfac/ekfac: Σ_ℓ Σ (Q_Sᵀ x Q_A)² ⊙ (Λ + λ); diagonal: Σ x² ⊙ (Λ + λ); identity: Σ x²;
    exact: xᵀ (G + diag(λ)) x. Exact for x = P(v); for a refined x it is xᵀ P⁻¹ x of EK-FAC's P.
    """
    if factors.strategy == "exact":
        x_QP = torch.cat([P[n].double().flatten(1) for n in factors.layer_names], 1)
        damping_P = torch.cat([torch.full((l.out_dim * l.in_dim,), l.damping, dtype=torch.float64) for l in factors.layers])
        return ((x_QP @ factors.ggn_PP.double().to(x_QP.device)) * x_QP).sum(1).cpu() + (x_QP**2 * damping_P.to(x_QP.device)).sum(1).cpu()
    total = 0
    for layer in factors.layers:
        x_QOI = P[layer.name].double()
        moved = layer.to(torch.float64, x_QOI.device)
        if factors.strategy == "identity":
            total = total + (x_QOI**2).sum((1, 2))
            continue
        if factors.strategy in ("kfac", "ekfac"):
            x_QOI = moved.QS_OO.T @ x_QOI @ moved.QA_II
        total = total + (x_QOI**2 * (moved.lambda_OI + moved.damping)).sum((1, 2))
    return total.cpu()


def normalized(score: float, self_value: float, query_value: float | None, kind: str) -> float:
    """relatif: score / √s(n) (Barshan et al., 2020); cosine: score / (√(‖P^{1/2}∇f_q‖²) √s(n))."""
    if kind == "relatif":
        return score / max(self_value, 1e-300) ** 0.5
    if kind == "cosine":
        return score / (max(self_value, 1e-300) * max(query_value, 1e-300)) ** 0.5
    raise ValueError(f"normalize: {kind!r} is not one of none, relatif, cosine")
