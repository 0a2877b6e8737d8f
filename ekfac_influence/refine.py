"""Refining EK-FAC's inverse-curvature–vector products toward the exact damped Gauss-Newton solve.

EK-FAC's P ≈ (G + λ)⁻¹ is block-diagonal over layers and Kronecker-shaped within each; the solve
that exact influence needs, x* = A⁻¹ v with A = G + Λ_λ (Λ_λ = λ_ℓ on layer ℓ's parameters, the
factors' own damping), couples the layers. Starting from EK-FAC's answer x₀ = P v, conjugate
gradients preconditioned by P (as ASTRA, Wang et al. 2025, refines with EK-FAC-preconditioned
iterations) move each query's x toward x*:

    r₀ = v − A x₀,  z₀ = P r₀,  p₀ = z₀
    α_k = ⟨r_k, z_k⟩ / ⟨p_k, A p_k⟩,   x_{k+1} = x_k + α_k p_k,   r_{k+1} = r_k − α_k A p_k
    z_{k+1} = P r_{k+1},  β_k = ⟨r_{k+1}, z_{k+1}⟩ / ⟨r_k, z_k⟩,  p_{k+1} = z_{k+1} + β_k p_k

stopping a query when ‖r_k‖ ≤ tolerance · ‖v‖. Step k costs one product A p for every query: a
pass over the refinement batches S (all training batches by default; the same ones at every
step), G_S u = (1/|S|) Σ_{n∈S} J_nᵀ H_n J_n u, the exact Gauss-Newton of softmax cross-entropy
(H = diag p − p pᵀ per position), not a sampled Fisher. Refinement costs steps + 1 such passes.

Why conjugate gradients rather than Richardson/Neumann steps: the operator is fixed (the same
batches every step), symmetric positive definite, and so is P; then CG decreases the A-norm error
at every step with no step size to choose, while a Richardson step x += P r converges only when
P A's spectrum lies inside (0, 2), which EK-FAC does not promise once layers interact.

J u per batch, by double backward: with w = J_sᵀ ū (ū a dummy cotangent on the logits), the change
of the logits along u is ∂⟨w, δs⟩/∂ū, where δs_ℓ = ā_ℓ U_ℓᵀ is how layer ℓ's output moves when its
weight moves by U_ℓ. That needs second derivatives of every op: attention runs on PyTorch's math
kernel during these products (the fused kernels have none).

Shapes: Q queries, B sequences, T positions, V vocabulary, I in-features (+1 bias), O out-features.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import distributed
from .factors import Factors
from .hooks import Capture, effective_mask
from .model import TrackedLayer
from .objectives import batch_size, to_device
from .passes import device_of, progress
from .precondition import precondition
from .storage import PassCheckpoint

Vectors = dict[str, Tensor]  # {layer: [Q, O, I]}, one direction per query


def gauss_newton_products(model, layers: list[TrackedLayer], batch, objective, U: Vectors) -> Vectors:
    """Σ_{n ∈ batch} G_n U_q for every query q, {layer: [Q, O, I]} in U's dtype (exact Gauss-Newton)."""
    if not hasattr(objective, "output_logits"):
        raise TypeError(f"{type(objective).__name__} has no output_logits(model, batch); refinement needs it")
    with Capture(layers) as capture, sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no 2nd derivative
        logits_BTV, valid_BT = objective.output_logits(model, batch)
    mask_BT = effective_mask(objective.token_mask(batch))
    acts = {l.name: capture.activations(l, mask_BT).to(logits_BTV.dtype) for l in layers}
    outputs = capture.outputs()
    cotangent_BTV = torch.zeros_like(logits_BTV, requires_grad=True)
    back = torch.autograd.grad(logits_BTV, outputs, grad_outputs=cotangent_BTV, create_graph=True, allow_unused=True)
    p_BTV = torch.softmax(logits_BTV.detach().double(), dim=-1) * valid_BT[..., None]
    Q = next(iter(U.values())).shape[0]
    out = {l.name: torch.zeros_like(U[l.name]) for l in layers}
    for q in range(Q):
        inner = sum((w * (acts[l.name] @ U[l.name][q].to(w.dtype).T).reshape(w.shape)).sum()
                    for l, w in zip(layers, back) if w is not None)
        if not torch.is_tensor(inner) or not inner.requires_grad:
            continue  # no tracked layer reaches the logits
        Ju_BTV = torch.autograd.grad(inner, cotangent_BTV, retain_graph=True)[0].double()
        HJu_BTV = p_BTV * (Ju_BTV - (p_BTV * Ju_BTV).sum(-1, keepdim=True))
        grads = torch.autograd.grad(logits_BTV, outputs, grad_outputs=HJu_BTV.to(logits_BTV.dtype), retain_graph=True,
                                    allow_unused=True)
        for l, g in zip(layers, grads):
            if g is not None:
                g_BTO = g.reshape(acts[l.name].shape[0], -1, g.shape[-1])
                out[l.name][q] = torch.einsum("bto,bti->oi", g_BTO, acts[l.name]).to(out[l.name].dtype)
    return out


def refinement_batches(batches: Iterable, count: int | None) -> Iterable:
    """The fixed batches of every refinement step: all of them (as given), or `count` spread evenly."""
    if count is None:
        return batches
    total = len(batches) if hasattr(batches, "__len__") else len(list(batches))
    chosen = {round(i * total / count) for i in range(min(count, total))}
    return [batch for index, batch in enumerate(batches) if index in chosen]


class DampedGaussNewton:
    """u ↦ (G_S + Λ_λ) u over fixed batches S, each process its share of them, one reduce per product."""

    def __init__(self, model, layers: list[TrackedLayer], factors: Factors, batches: Iterable, objective):
        self.model, self.layers, self.batches, self.objective = model, layers, batches, objective
        self.damping = {layer.name: layer.damping for layer in factors.layers}

    def __call__(self, U: Vectors) -> Vectors:
        device = device_of(self.model)
        total = {name: torch.zeros_like(u) for name, u in U.items()}
        sequences = 0
        moved = {name: u.to(device) for name, u in U.items()}
        for _, _, batch in distributed.shard(self.batches, batch_size):
            batch = to_device(batch, device)
            for name, value in gauss_newton_products(self.model, self.layers, batch, self.objective, moved).items():
                total[name] += value.to(total[name].device)
            sequences += batch_size(batch)
        count = torch.tensor([float(sequences)], dtype=torch.float64, device=next(iter(total.values())).device)
        distributed.sum_reduce_(list(total.values()) + [count])
        return {name: total[name] / count[0] + self.damping[name] * U[name] for name in U}


def inner(a: Vectors, b: Vectors) -> Tensor:
    """⟨a_q, b_q⟩ over all layers' parameters, for each query: [Q] float64."""
    return sum((a[name].double() * b[name].double()).flatten(1).sum(1) for name in a)


def refine(operator, factors: Factors, V: Vectors, *, steps: int, tolerance: float = 0.0,
           show_progress: bool = True, checkpoint: PassCheckpoint | None = None, name: str = "refine") -> Vectors:
    """x ≈ A⁻¹ V for every query by P-preconditioned conjugate gradients from x₀ = P V (float64).

    operator: u ↦ A u (a `DampedGaussNewton`). checkpoint: the state after each step is saved under
    `name`, so that an interrupted refinement resumes at the step it had reached.
    """
    V = {key: v.double() for key, v in V.items()}
    solve = lambda R: precondition(R, factors, torch.float64)  # noqa: E731  (P, the EK-FAC inverse)
    state = checkpoint.load(name) if checkpoint is not None else None
    if state is not None:
        tensors, meta = state
        x, r, p = ({key[2:]: t for key, t in tensors.items() if key.startswith(prefix)} for prefix in ("x/", "r/", "p/"))
        rz, start = tensors["rz"], meta["step"]
        distributed.print0(f"resuming the refinement at step {start}")
    else:
        x = solve(V)
        AX = operator(x)
        r = {key: V[key] - AX[key] for key in V}
        p = solve(r)
        rz, start = inner(r, p), 0
    goal_Q = tolerance * inner(V, V).sqrt()
    bar = progress(range(start, steps), "refinement", show_progress)
    for step in bar:
        active_Q = inner(r, r).sqrt() > goal_Q
        if not bool(active_Q.any()):
            break
        Ap = operator(p)
        alpha_Q = torch.where(active_Q, rz / inner(p, Ap), torch.zeros_like(rz))
        x = {key: x[key] + _per_query(alpha_Q, p[key]) for key in x}
        r = {key: r[key] - _per_query(alpha_Q, Ap[key]) for key in r}
        z = solve(r)
        rz_next = inner(r, z)
        beta_Q = torch.where(active_Q, rz_next / rz, torch.zeros_like(rz))
        p = {key: z[key] + _per_query(beta_Q, p[key]) for key in p}
        rz = torch.where(active_Q, rz_next, rz)
        if checkpoint is not None and checkpoint.due(step + 1):
            tensors = {**{f"x/{k}": v for k, v in x.items()}, **{f"r/{k}": v for k, v in r.items()},
                       **{f"p/{k}": v for k, v in p.items()}, "rz": rz}
            checkpoint.save(name, tensors, {"step": step + 1})
        if show_progress and hasattr(bar, "set_postfix_str"):
            relative = (inner(r, r).sqrt() / inner(V, V).sqrt().clamp_min(1e-300)).max().item()
            bar.set_postfix_str(f"max ‖r‖/‖v‖ {relative:.1e}" if math.isfinite(relative) else "")
    return x


def _per_query(scale_Q: Tensor, U_QOI: Tensor) -> Tensor:
    return scale_Q.to(U_QOI)[:, None, None] * U_QOI
