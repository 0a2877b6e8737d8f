"""Self-influence: auditing a training corpus (docs/design.md §1), with the sketches that `similarity` searches
for near-duplicates.

Shapes: N training sequences, B batch, T positions, I in-features (+1 bias), O out-features,
C candidates, D whitened features. With DW_n = Σ_t g_t ā_tᵀ (g = ∂L/∂s; ∇log p(z_n) = −DW_n, and
the sign cancels in every product below):

    s(n) = ∇log p(z_n)ᵀ (G + λI)⁻¹ ∇log p(z_n) = Σ_ℓ s_ℓ(n)          (self-influence, ≥ 0)
    identity:   s_ℓ = ‖DW‖²             diagonal: s_ℓ = Σ DW² ⊘ (Λ + λ)
    kfac/ekfac: s_ℓ = Σ R² ⊘ (Λ + λ),  R = Q_Sᵀ DW Q_A   (rotate, then square: P(DW) is never formed;
                R in the cheapest of four contraction orders, `factors.rotation_costs`)
    exact:      s_ℓ = ⟨P(DW)_ℓ, DW_ℓ⟩, P the dense damped Gauss-Newton solve (layers coupled)
    per token:  s_t(n) = Σ_ℓ g_tᵀ P(DW_n)_ℓ ā_t = Σ_ℓ (Q_Sᵀ g_t)ᵀ [R ⊘ (Λ + λ)] (Q_Aᵀ ā_t)

These are the diagonal of `influence.compute_scores` of the training set against itself, where the
measurement of sequence n is log p(z_n). The whitened gradient W_n = P^{1/2} DW_n (kfac/ekfac:
R ⊘ √(Λ + λ) per layer; exact: L⁻¹ vec DW with L Lᵀ = G + diag(λ)) has ‖W_n‖² = s(n), and
cos(n, m) = ⟨W_n, W_m⟩ / (‖W_n‖ ‖W_m‖) finds sequences whose gradients are almost parallel.

Near-duplicates are searched over the whole corpus, not only among the sequences of high s(n):
a memorised passage (a license header seen a thousand times) has a small gradient and so a LOW
self-influence. The pass keeps a sketch of every sequence's whitened gradient, k² numbers
(k = `duplicate_sketch`): per layer Ω_O P^{1/2}(DW) Ω_I with seeded Gaussian Ω_O [k, O], Ω_I [I, k]
(entries of variance 1/k), summed over layers. For kfac/ekfac P^{1/2}(DW) = Q_S (R ⊘ √(Λ + λ)) Q_Aᵀ,
the symmetric root, so the sketch is (Ω_O Q_S) W (Q_Aᵀ Ω_I): no extra rotation, and the same
whatever signs eigh gave the eigenvectors. Inner products of sketches are unbiased estimates of
⟨W_n, W_m⟩; identical sequences sketch alike. A sketched cosine c is off by about (1 − c²)/k when
the whitened gradients have a rank well above k, and by up to (1 − c²)·√(2/k) for a gradient of
rank one (a single token): the sketch of W = u vᵀ is (Ω_O u)(vᵀ Ω_I), two k-dimensional projections.

A tolerance ε > 0 (kfac/ekfac) trades the rotation for a bound. With w = Λ / (Λ + λ) ∈ [0, 1),
a direction of small w is almost undamped by the curvature: 1 / (Λ + λ) ≈ 1/λ. On a trained model
w is small in almost every direction (the spectrum falls fast), so only the directions where w > ε
are rotated onto: a cross of rows K of R (eigenvectors of S, every column) and columns J
(eigenvectors of A, every row), `truncation` choosing a cheap cross that holds every w > ε. The
rest is counted as if Λ = 0, through the residual E = (I − Q_K Q_Kᵀ) DW (I − Q_J Q_Jᵀ) that the
cross leaves (Q_K: those columns of Q_S, Q_J: of Q_A):

    s_ℓ ≈ ‖E‖² / λ + Σ_cross R² / (Λ + λ),   over-estimating s_ℓ by Σ_rest R² w / λ ≤ w_rest ‖E‖² / λ,

w_rest ≤ ε the largest w outside the cross. So s(n) − error(n) ≤ s_exact(n) ≤ s(n) with
error(n) = Σ_ℓ w_rest,ℓ ‖E_ℓ(n)‖² / λ_ℓ, stored per sequence; relatively, error ≤ ε / (1 − ε) · s.
Every term is a sum of squares: ‖DW‖² − Σ_cross R² would give ‖E‖² too, but in float32 it cancels
catastrophically when the cross holds nearly all of DW (errors of several % were measured). The cost
per sequence is T·O·I (DW) + |K|·(2·O·I + I²) + |J|·(2·O·I + O²) instead of a full rotation. The
per-token values and the sketch use the same split: P(DW) = E / λ + Q_S (R / (Λ + λ) on the cross) Q_Aᵀ,
and P^{1/2} likewise with square roots.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import distributed
from .config import SelfInfluenceConfig
from .factors import Factors, LayerFactors, check_factors_match, rotated_gradients, rotation_costs, sequence_gradients
from .objectives import Objective
from .passes import BatchCapture, NonFiniteError, capture_pass, device_of, evaluation_mode
from .precondition import exact_inverse_product
from .storage import PassCheckpoint

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac", "exact")


@dataclass
class SelfInfluenceResult:
    """s(n) of every training sequence, in data order: values [N], per_layer {layer: [N]}, per_token [N, T],
    and sketch [N, k²], the sketched whitened gradients that `near_duplicate_groups` compares."""

    values: Tensor
    per_layer: dict[str, Tensor]
    per_token: Tensor | None = None
    num_train_sequences: int = 0
    sketch: Tensor | None = None
    error: Tensor | None = None
    """With a tolerance: error [N], s(n) − error(n) ≤ exact s(n) ≤ s(n) (module docstring); None when exact."""

    def max_relative_error(self) -> float | None:
        """The largest error(n) / s(n): every s(n) over-estimates the exact value by at most this fraction; None when exact."""
        if self.error is None:
            return None
        relative_N = self.error.double() / self.values.double().clamp_min(torch.finfo(torch.float64).tiny)
        return float(relative_N.max()) if len(relative_N) else 0.0


# ----------------------------------------------------------------------------- kernels


def layer_whitening(g_BTO: "Tensor | list[Tensor]", a_BTI: "Tensor | list[Tensor]", factors: LayerFactors,
                    strategy: str, *, scale: bool = True) -> tuple[Tensor, Tensor | None, tuple]:
    """(R_BOI, scale_OI, rotated tokens): the layer's gradient in P's eigenbasis and 1 / (Λ + λ) there (None: P = I,
    or not asked for), and (g Q_S, ā Q_A) where the chosen order rotated them (None where it did not). Lists of
    batches (`sequence_gradients`) give R over all their sequences and lists of tokens.

    s_ℓ = Σ R² · scale and W = R · √scale. identity and diagonal work in the original basis.
    """
    inverse = lambda: 1 / (factors.lambda_OI + factors.damping) if scale else None  # noqa: E731
    if strategy in ("kfac", "ekfac"):
        R_BOI, g_rotated, a_rotated = rotated_gradients(g_BTO, a_BTI, factors.QS_OO, factors.QA_II)
        return R_BOI, inverse(), (g_rotated, a_rotated)
    DW_BOI = sequence_gradients(g_BTO, a_BTI)
    if strategy == "identity":
        return DW_BOI, None, (g_BTO, a_BTI)
    if strategy == "diagonal":
        return DW_BOI, inverse(), (g_BTO, a_BTI)
    raise ValueError(f"strategy {strategy!r} has no per-layer whitening; self-influence supports {', '.join(STRATEGIES)}")


@dataclass(frozen=True)
class Truncation:
    """The directions of one layer that a tolerance-ε audit rotates onto (module docstring): rows_K of R
    (eigenvectors of S) and columns_J (eigenvectors of A); outside the cross w ≤ w_rest ≤ ε.

    inverse_KI, inverse_OJ: 1 / (Λ + λ) on the rows and on the columns, the columns' zero on the corner
    (rows_K × columns_J, counted once, with the rows); root_KI, root_OJ: their square roots.
    """

    rows_K: Tensor
    columns_J: Tensor
    w_rest: float
    cost: int  # multiply-adds per sequence beyond forming DW
    QS_OK: Tensor
    QA_IJ: Tensor
    inverse_KI: Tensor
    inverse_OJ: Tensor
    root_KI: Tensor
    root_OJ: Tensor

    def worth_it(self, T: int, O: int, I: int) -> bool:
        """Cheaper than the cheapest full rotation for sequences of T positions."""
        return T * O * I + self.cost < min(rotation_costs(T, O, I).values())

    def ever_worth_it(self, O: int, I: int) -> bool:
        """Cheaper than a full rotation at some length: rotating DW costs O·I·(O + I) beyond forming it at every length,
        so the cheapest order never costs more; a cross that costs as much is never taken."""
        return self.cost < O * I * (O + I)

    def to(self, dtype: torch.dtype, device=None) -> "Truncation":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                moved[name] = value.to(device=device, dtype=dtype)
        return Truncation(**moved)


def cross_cost(rows: int, columns: int, O: int, I: int) -> int:
    """Multiply-adds per sequence of a cross beyond DW: each row Q_kᵀ DW, its rotation by Q_A and its share of
    the residual; each column DW q_j, its rotation by Q_Sᵀ and its share of the residual."""
    return rows * (2 * O * I + I * I) + columns * (2 * O * I + O * O)


def truncation(layer: LayerFactors, tolerance: float) -> Truncation:
    """A cheap cross of rows and columns of the eigenbasis that holds every direction with w > tolerance.

    Rows are taken greedily in order of their largest w; for each number k of rows the columns still
    holding a w > tolerance outside them are added, and the k of least cost wins; likewise with the roles
    of rows and columns swapped.
    """
    lam_OI = layer.lambda_OI.double()
    w_OI = lam_OI / (lam_OI + layer.damping)
    O, I = w_OI.shape
    best = None
    for swapped in (False, True):
        w_XY = w_OI.T if swapped else w_OI
        X = w_XY.shape[0]
        order_X = w_XY.amax(1).argsort(descending=True)
        above_XY = w_XY[order_X] > tolerance
        last_Y = torch.where(above_XY, torch.arange(X)[:, None], -1).amax(0)  # the last ranked row above, per column
        needed_K = (last_Y[None, :] >= torch.arange(X + 1)[:, None]).sum(1)  # columns needed with the first k rows
        rows_K, columns_K = (needed_K, torch.arange(X + 1)) if swapped else (torch.arange(X + 1), needed_K)
        costs_K = cross_cost(rows_K, columns_K, O, I)
        k = int(costs_K.argmin())
        if best is None or int(costs_K[k]) < best[0]:
            chosen_X, chosen_Y = order_X[:k], torch.nonzero(last_Y >= k).flatten()
            rows, columns = (chosen_Y, chosen_X) if swapped else (chosen_X, chosen_Y)
            best = (int(costs_K[k]), rows.sort().values, columns.sort().values)
    cost, rows_K, columns_J = best
    outside_OI = torch.ones(O, I, dtype=torch.bool)
    outside_OI[rows_K] = False
    outside_OI[:, columns_J] = False
    w_rest = float(w_OI[outside_OI].max()) if outside_OI.any() else 0.0
    inverse_OI = 1 / (lam_OI + layer.damping)
    keep_OJ = torch.ones(O, len(columns_J), dtype=torch.float64)
    keep_OJ[rows_K] = 0
    inverse_KI, inverse_OJ = inverse_OI[rows_K], inverse_OI[:, columns_J] * keep_OJ
    return Truncation(rows_K, columns_J, w_rest, cost, layer.QS_OO[:, rows_K], layer.QA_II[:, columns_J],
                      inverse_KI, inverse_OJ, inverse_KI.sqrt(), inverse_OJ.sqrt())


def truncated_self_influence(g_BTO: "Tensor | list[Tensor]", a_BTI: "Tensor | list[Tensor]", plan: "LayerPlan", *,
                             per_token: bool = False) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(s_B, error_B, tokens_BT or None, sketch_BK or None) of one layer with a tolerance (module docstring), over
    one batch or a list of batches (`sequence_gradients`)."""
    layer, cut = plan.factors, plan.cut
    DW_BOI = sequence_gradients(g_BTO, a_BTI)
    B, O, J = DW_BOI.shape[0], layer.out_dim, len(cut.columns_J)
    rows_BKI = cut.QS_OK.T @ DW_BOI  # Q_Kᵀ DW
    columns_BOJ = DW_BOI @ cut.QA_IJ  # DW Q_J
    R_BKI = rows_BKI @ layer.QA_II
    # Q_Sᵀ (DW Q_J) as one product over the batch: [O, O] @ [O, B·J] (a batched product of width J is slow)
    R_BOJ = (layer.QS_OO.T @ columns_BOJ.transpose(0, 1).reshape(O, B * J)).view(O, B, J).transpose(0, 1)
    # E = (I − Q_K Q_Kᵀ) DW (I − Q_J Q_Jᵀ) = DW − [Q_K | DW Q_J − Q_K (Q_Kᵀ DW Q_J)] @ [Q_Kᵀ DW ; Q_Jᵀ], one product
    # subtracted in place (a pass over a [B, O, I] tensor costs as much as the product here)
    K, I = len(cut.rows_K), layer.in_dim
    left_BOX = torch.cat([cut.QS_OK.expand(B, O, K), columns_BOJ - cut.QS_OK @ (rows_BKI @ cut.QA_IJ)], 2)
    right_BXI = torch.cat([rows_BKI, cut.QA_IJ.T.expand(B, J, I)], 1)
    E_BOI = DW_BOI.baddbmm_(left_BOX, right_BXI, alpha=-1)
    outside_B = _squared_norms(E_BOI)
    W_BKI, W_BOJ = R_BKI * cut.root_KI, R_BOJ * cut.root_OJ  # P^{1/2} on the cross: Σ W² = Σ R² / (Λ + λ)
    s_B = outside_B / layer.damping + _squared_norms(W_BKI) + _squared_norms(W_BOJ)
    error_B = cut.w_rest * outside_B / layer.damping
    tokens_BT = sketch_BK = None
    if per_token:  # g_tᵀ P(DW) ā_t
        X_BOI = (E_BOI / layer.damping + cut.QS_OK @ (R_BKI * cut.inverse_KI) @ layer.QA_II.T
                 + layer.QS_OO @ (R_BOJ * cut.inverse_OJ) @ cut.QA_IJ.T)
        tokens_BT = token_products(g_BTO, X_BOI, a_BTI)
    if plan.sketch is not None:  # Ω_O P^{1/2}(DW) Ω_I
        maps = plan.sketch
        sketch_BK = (maps.plain_KO @ E_BOI @ maps.plain_IK) * layer.damping**-0.5
        sketch_BK = sketch_BK.baddbmm_(maps.left_rows_KK @ W_BKI, maps.right_IK.expand(B, I, -1))
        sketch_BK = sketch_BK.baddbmm_(maps.left_KO @ W_BOJ, maps.right_columns_JK.expand(B, J, -1))
        sketch_BK = sketch_BK.flatten(1)
    return s_B, error_B, tokens_BT, sketch_BK


def _squared_norms(X_BXY: Tensor) -> Tensor:
    return torch.linalg.vector_norm(X_BXY.flatten(1), dim=1).square()


def token_products(g_BTO: "Tensor | list[Tensor]", X_BOI: Tensor, a_BTI: "Tensor | list[Tensor]") -> Tensor:
    """tokens_BT = g_tᵀ X_b ā_t; lists of batches of equal T (`sequence_gradients`) give their rows in order."""
    if isinstance(g_BTO, Tensor):
        return (torch.einsum("bto,boi->bti", g_BTO, X_BOI) * a_BTI).sum(-1)
    rows = _row_starts([len(g) for g in g_BTO])
    return torch.cat([token_products(g, X_BOI[start:end], a) for g, a, start, end in zip(g_BTO, a_BTI, rows, rows[1:])])


def _row_starts(sizes: list[int]) -> list[int]:
    """[0, s_0, s_0 + s_1, ...]: where each batch's rows start in a tensor over several, and where the last ends."""
    return torch.cumsum(torch.tensor([0, *sizes]), 0).tolist()


@dataclass(frozen=True)
class SketchMaps:
    """One layer's maps of the whole-corpus sketch (module docstring): Ω_O Q_S [k, O] and Q_Aᵀ Ω_I [I, k] for a
    gradient in the eigenbasis (Ω_O, Ω_I for identity and diagonal), the plain Ω_O and Ω_I for one in the original
    basis, and, with a tolerance's cross, the columns of Ω_O Q_S at its rows and the rows of Q_Aᵀ Ω_I at its columns."""

    left_KO: Tensor
    right_IK: Tensor
    plain_KO: Tensor
    plain_IK: Tensor
    left_rows_KK: Tensor | None = None
    right_columns_JK: Tensor | None = None


@dataclass(frozen=True)
class LayerPlan:
    """One layer's constants for a whole pass, made once in the compute dtype on the gradients' device."""

    factors: LayerFactors
    root_OI: Tensor | None  # 1 / √(Λ + λ) (kfac/ekfac: in the eigenbasis); None where P = I
    cut: Truncation | None = None  # a tolerance's cross
    sketch: SketchMaps | None = None


@dataclass(frozen=True)
class AuditPlan:
    """What `group_self_influence` needs besides the batches: {layer: LayerPlan} (kfac/ekfac/diagonal/identity) or,
    for the exact strategy, the one Gaussian Ω [P, k²] of its sketch."""

    dtype: torch.dtype
    layers: dict[str, LayerPlan]
    exact_sketch: Tensor | None = None
    per_token: bool = False
    tolerance: bool = False  # a tolerance was asked for (kfac/ekfac): every batch reports its error, zero where no layer was cut


def plan_audit(factors: Factors, config: SelfInfluenceConfig, device: torch.device | str = "cpu") -> AuditPlan:
    """The pass's constants: factors in the compute dtype, 1 / √(Λ + λ), a tolerance's crosses and the sketch maps.

    Blocked factors are never cut (they rotate cheaply). Seeded by the layers' names: every process and every run
    draws the same Ω.
    """
    dtype = getattr(torch, config.compute_dtype)
    side = config.duplicate_sketch
    if factors.strategy == "exact":
        size = sum(layer.out_dim * layer.in_dim for layer in factors.layers)
        omega = torch.randn(size, side * side, generator=seeded("exact"), dtype=torch.float64) / side if side else None
        return AuditPlan(dtype, {}, None if omega is None else omega.to(device), config.per_token)
    plans = {}
    tolerance = config.tolerance > 0 and factors.strategy in ("kfac", "ekfac")
    for layer in factors.layers:
        moved = layer.to(dtype, device)
        root_OI = None if factors.strategy == "identity" else (moved.lambda_OI + moved.damping).rsqrt()
        cut = None
        if tolerance and isinstance(layer.QS_OO, Tensor) and isinstance(layer.QA_II, Tensor):
            cut = truncation(layer, config.tolerance)
            cut = cut.to(dtype, device) if cut.ever_worth_it(layer.out_dim, layer.in_dim) else None
        maps = None
        if side:
            left_KO, right_IK, plain_KO, plain_IK = (m.to(device=device, dtype=dtype)
                                                     for m in _sketch_maps(layer, factors.strategy, side))
            maps = SketchMaps(left_KO, right_IK, plain_KO, plain_IK)
            if cut is not None:
                maps = dataclasses.replace(maps, left_rows_KK=left_KO[:, cut.rows_K].contiguous(),
                                           right_columns_JK=right_IK[cut.columns_J].contiguous())
        plans[layer.name] = LayerPlan(moved, root_OI, cut, maps)
    return AuditPlan(dtype, plans, None, config.per_token, tolerance)


Parts = dict[str, list[Tensor]]  # layer -> one tensor per batch of a group
Values = tuple[dict[str, Tensor], Tensor | None, Tensor | None, Tensor | None]  # per layer, per token, sketch, error


def group_self_influence(items: list[BatchCapture], factors: Factors, plan: AuditPlan) -> list[Values]:
    """({layer: s_B}, tokens_BT or None, sketch_BK or None, error_B or None) of each captured batch (on the CPU).

    The batches (of equal T) are worked as one: `sequence_gradients` writes their DW into one tensor, and every
    product after it runs once over all their sequences. A value that is not finite is traced to the layer and
    batch whose activations or gradients hold NaN or inf (`BatchCapture.check_finite`), or else named as an overflow.
    """
    names = factors.layer_names
    grads = {n: [item.grads[n].to(plan.dtype) for item in items] for n in names}
    acts = {n: [item.acts[n].to(plan.dtype) for item in items] for n in names}
    work = _exact_group if factors.strategy == "exact" else _layered_group
    per_layer, tokens_BT, sketch_BK, error_B = work(grads, acts, factors, plan)
    rows = _row_starts([item.num_sequences for item in items])
    _check_finite(per_layer, items, rows)
    share = lambda x, i: None if x is None else x[rows[i]:rows[i + 1]].cpu()  # noqa: E731
    return [({n: share(per_layer[n], i) for n in names}, share(tokens_BT, i), share(sketch_BK, i), share(error_B, i))
            for i in range(len(items))]


def _exact_group(grads: Parts, acts: Parts, factors: Factors, plan: AuditPlan) -> Values:
    """The exact strategy: every layer's DW at once through the dense damped Gauss-Newton (layers coupled)."""
    names, dtype = factors.layer_names, plan.dtype
    DW = {n: sequence_gradients(grads[n], acts[n]) for n in names}
    P = exact_inverse_product(DW, factors)
    per_layer = {n: (P[n].to(dtype) * DW[n]).sum((1, 2)) for n in names}
    tokens_BT = sum(token_products(grads[n], P[n].to(dtype), acts[n]) for n in names) if plan.per_token else None
    sketch_BK = None if plan.exact_sketch is None else (exact_whitened(DW, factors) @ plan.exact_sketch).to(dtype)
    return per_layer, tokens_BT, sketch_BK, None


def _layered_group(grads: Parts, acts: Parts, factors: Factors, plan: AuditPlan) -> Values:
    """Layer by layer (kfac/ekfac/diagonal/identity). A layer with a tolerance's cross is rotated in full where the
    cross costs more than a full rotation at this length."""
    per_layer, tokens_BT, sketch_BK, error_B = {}, None, None, None
    add = lambda total, part: part if total is None else total + part  # noqa: E731
    for name in factors.layer_names:
        layer_plan, g_BTO, a_BTI = plan.layers[name], grads[name], acts[name]
        moved, cut = layer_plan.factors, layer_plan.cut
        if cut is not None and cut.worth_it(g_BTO[0].shape[1], moved.out_dim, moved.in_dim):
            per_layer[name], layer_error_B, layer_BT, layer_BK = truncated_self_influence(g_BTO, a_BTI, layer_plan,
                                                                                          per_token=plan.per_token)
            error_B = add(error_B, layer_error_B)
            tokens_BT = tokens_BT if layer_BT is None else add(tokens_BT, layer_BT)
            sketch_BK = sketch_BK if layer_BK is None else add(sketch_BK, layer_BK)
            continue
        R_BOI, _, (g_rotated, a_rotated) = layer_whitening(g_BTO, a_BTI, moved, factors.strategy, scale=False)
        W_BOI = R_BOI if layer_plan.root_OI is None else R_BOI * layer_plan.root_OI  # s_ℓ = ‖W‖²
        per_layer[name] = _squared_norms(W_BOI)
        if plan.per_token:  # in the eigenbasis: g_tᵀ P(DW) ā_t = (Q_Sᵀ g_t)ᵀ X (Q_Aᵀ ā_t), X = W ⊙ root
            X_BOI = W_BOI if layer_plan.root_OI is None else W_BOI * layer_plan.root_OI
            g_rotated = [g @ moved.QS_OO for g in g_BTO] if g_rotated is None else g_rotated
            a_rotated = [a @ moved.QA_II for a in a_BTI] if a_rotated is None else a_rotated
            tokens_BT = add(tokens_BT, token_products(g_rotated, X_BOI, a_rotated))
        if layer_plan.sketch is not None:
            sketch_BK = add(sketch_BK, (layer_plan.sketch.left_KO @ W_BOI @ layer_plan.sketch.right_IK).flatten(1))
    if error_B is None and plan.tolerance:
        error_B = torch.zeros(next(iter(per_layer.values())).shape, dtype=plan.dtype)
    return per_layer, tokens_BT, sketch_BK, error_B


def _check_finite(per_layer: dict[str, Tensor], items: list[BatchCapture], rows: list[int]) -> None:
    """NaN or inf in any activation or gradient reaches its sequence's s_B (each one enters DW = Σ_t g_t ā_tᵀ, and no
    product mixes sequences), so finite values need no look at the inputs. Until this pass skipped the capture's
    check, an overflow of finite inputs gave s(n) = inf; it now stops the pass, naming the batch."""
    for name, s_B in per_layer.items():
        bad = torch.nonzero(~torch.isfinite(s_B)).flatten().tolist()
        if bad:
            for item in items:
                item.check_finite()
            item = items[max(i for i, start in enumerate(rows[:-1]) if start <= bad[0])]
            further = "" if s_B.dtype == torch.float64 else " (self_influence.compute_dtype float64 reaches further)"
            raise NonFiniteError(f"the self-influence of layer {name} in {item.where} is not finite although its "
                                 f"activations and gradients are: an overflow in {s_B.dtype}{further}")


def exact_whitened(DW: dict[str, Tensor], factors: Factors) -> Tensor:
    """W_BP = L⁻¹ vec DW in float64, L Lᵀ = G + diag(λ) (so ‖W‖² = vᵀ (G + diag(λ))⁻¹ v)."""
    V_BP = torch.cat([DW[n].flatten(1) for n in factors.layer_names], 1).double()
    damping_P = torch.cat([torch.full((l.out_dim * l.in_dim,), l.damping, dtype=torch.float64) for l in factors.layers])
    L_PP = torch.linalg.cholesky(factors.ggn_PP.double().to(V_BP.device) + torch.diag(damping_P.to(V_BP.device)))
    return torch.linalg.solve_triangular(L_PP, V_BP.T, upper=False).T


def _sketch_maps(layer: LayerFactors, strategy: str, side: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Ω_O Q_S [k, O], Q_Aᵀ Ω_I [I, k], Ω_O, Ω_I) in float64, seeded by the layer's name; identity and diagonal
    whiten in the original basis, so their maps are Ω_O and Ω_I."""
    generator = seeded(layer.name)
    omega_KO = torch.randn(side, layer.out_dim, generator=generator, dtype=torch.float64) / side**0.5
    omega_IK = torch.randn(layer.in_dim, side, generator=generator, dtype=torch.float64) / side**0.5
    if strategy in ("kfac", "ekfac"):
        return omega_KO @ layer.QS_OO.double(), layer.QA_II.double().T @ omega_IK, omega_KO, omega_IK
    return omega_KO, omega_IK, omega_KO, omega_IK


def seeded(name: str) -> torch.Generator:
    """A generator seeded by `name`: every process and every run draws the same Ω for a layer."""
    return torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:15], 16))


# ----------------------------------------------------------------------------- the pass


GROUP_SEQUENCES = 16
"""Captured batches are worked in groups of about this many sequences (`group_self_influence`): on a small model
each product is too short to pay for its call. On the benchmark model's batches of 8, groups of 16 cut the pass from
1.16 to 1.08 epochs; 24 and 32 gave 1.10 (docs/benchmarks.md)."""
GROUP_BYTES = 256 * 2**20
"""A batch joins a group only while the group's estimate (`_group_bytes`) stays within this; a batch too large to be
paired is worked at once, alone, as before groups."""


def self_influence(model: nn.Module, factors: Factors, train_batches: Iterable, objective: Objective,
                   config: SelfInfluenceConfig = SelfInfluenceConfig(), *, show_progress: bool = True,
                   checkpoint: PassCheckpoint | None = None) -> SelfInfluenceResult:
    """s(n) = ∇log p(z_n)ᵀ (G + λI)⁻¹ ∇log p(z_n) for every training sequence, per layer (and per token).

    One pass with the real training loss; each process takes its share of the batches and the
    results are merged, in data order, on every process. Batches of equal T are worked in groups of
    about GROUP_SEQUENCES sequences where GROUP_BYTES allows. With `checkpoint` the pass saves this
    process's finished batches now and then, and a rerun with the same checkpoint resumes after them.
    """
    layers = check_factors_match(factors, model)
    if factors.strategy not in STRATEGIES:
        raise ValueError(f"self-influence needs one of the strategies {', '.join(STRATEGIES)}, not {factors.strategy!r}")
    local, start = _restore(checkpoint, factors.layer_names)
    plan = plan_audit(factors, config, device_of(model))
    largest = max(layer.out_dim * layer.in_dim for layer in factors.layers)
    itemsize = torch.empty((), dtype=plan.dtype).element_size()
    due = lambda item: checkpoint is not None and checkpoint.due(item.index + 1)  # noqa: E731
    with evaluation_mode(model):
        items = capture_pass(model, layers, train_batches, objective, loss="real", desc="self-influence",
                             show_progress=show_progress, start=start, check=False)
        for group in _grouped(items, lambda batches: _group_bytes(batches, largest, itemsize), due):
            values = group_self_influence(group, factors, plan)
            local.update({batch.index: value for batch, value in zip(group, values)})
            if due(group[-1]):
                _save(checkpoint, local, group[-1].index + 1, factors.layer_names)
            group.clear()  # the captures are freed before the next batch is captured
    merged = distributed.gather_by_key(local)
    if not merged:
        raise ValueError("train_batches is empty: no training sequence to audit")
    return _assemble(merged, factors.layer_names, factors.num_sequences)


def _grouped(items: Iterable[BatchCapture], bytes_of: Callable[[list[BatchCapture]], int],
             ends: Callable[[BatchCapture], bool]) -> Iterator[list[BatchCapture]]:
    """The captured batches in the groups to work as one: batches of equal T, each group closed as soon as it holds
    GROUP_SEQUENCES sequences, one more batch like its last would take it past GROUP_BYTES, or `ends(batch)` (a
    checkpoint is due), so that a batch that cannot be paired is worked before the next one is captured."""
    group: list[BatchCapture] = []
    for item in items:
        if group and (_length(item) != _length(group[0]) or bytes_of([*group, item]) > GROUP_BYTES):
            yield group
            group = []
        group.append(item)
        if (sum(batch.num_sequences for batch in group) >= GROUP_SEQUENCES
                or bytes_of([*group, group[-1]]) > GROUP_BYTES or ends(item)):
            yield group
            group = []
        del item  # not held while the next batch is captured
    if group:
        yield group


def _length(batch: BatchCapture) -> int:
    return next(iter(batch.acts.values())).shape[1]


def _group_bytes(batches: list[BatchCapture], largest: int, itemsize: int) -> int:
    """An estimate of what working `batches` as one holds: their activations and gradients, a copy of them in the
    compute dtype, and four tensors of the largest layer's DW over their sequences (DW or E, R, W, per-token X)."""
    captured = [t for batch in batches for t in (*batch.acts.values(), *batch.grads.values())]
    sequences = sum(batch.num_sequences for batch in batches)
    return sum(t.numel() * (t.element_size() + itemsize) for t in captured) + 4 * sequences * largest * itemsize


def _assemble(merged: dict, names: list[str], num_sequences: int) -> SelfInfluenceResult:
    order = sorted(merged)
    per_layer = {n: torch.cat([merged[i][0][n] for i in order]) for n in names}
    values = sum(per_layer[n] for n in names)
    per_token = None
    if merged[order[0]][1] is not None:
        width = max(merged[i][1].shape[1] for i in order)
        per_token = torch.cat([nn.functional.pad(merged[i][1], (0, width - merged[i][1].shape[1])) for i in order])
    sketch = torch.cat([merged[i][2] for i in order]) if merged[order[0]][2] is not None else None
    error = torch.cat([merged[i][3] for i in order]) if merged[order[0]][3] is not None else None
    return SelfInfluenceResult(values, per_layer, per_token, num_sequences, sketch, error)


def _save(checkpoint: PassCheckpoint, local: dict, next_batch: int, names: list[str]) -> None:
    """This process's finished batches: {batch}/{layer} = s_B (and {batch}/tokens, /sketch, /error), with the next
    batch to read."""
    tensors = {f"{i}/{n}": per_layer[n] for i, (per_layer, *_) in local.items() for n in names}
    for part, slot in (("tokens", 1), ("sketch", 2), ("error", 3)):
        tensors.update({f"{i}/{part}": item[slot] for i, item in local.items() if item[slot] is not None})
    checkpoint.save("self_influence", tensors, {"next_batch": next_batch, "batches": sorted(local)})


def _restore(checkpoint: PassCheckpoint | None, names: list[str]) -> tuple[dict, int]:
    state = checkpoint.load("self_influence") if checkpoint is not None else None
    if state is None:
        return {}, 0
    tensors, meta = state
    local = {i: ({n: tensors[f"{i}/{n}"] for n in names}, tensors.get(f"{i}/tokens"), tensors.get(f"{i}/sketch"),
                 tensors.get(f"{i}/error")) for i in meta["batches"]}
    distributed.print0(f"resuming self-influence at batch {meta['next_batch']} (saved progress)")
    return local, meta["next_batch"]
