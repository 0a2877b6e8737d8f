"""Reference curvatures: the exact Gauss-Newton of small models, and LiSSA (below the stages that use them).

Shapes: Q queries, B sequences, T positions, V classes (vocabulary), I in-features (+1 bias),
O out-features, P tracked parameters (all layers, each O × I flattened row-major).

Exact GGN. For softmax cross-entropy with logits z_t, H_t = diag(p_t) − p_t p_tᵀ = R_tᵀ R_t with
R_t = diag(√p_t) − √p_t p_tᵀ (check: RᵀR = diag p − 2ppᵀ + p(Σp)pᵀ). So, per sequence,

    G_n = Σ_t J_tᵀ H_t J_t = Σ_t Σ_v (J_tᵀ r_{t,v}) (J_tᵀ r_{t,v})ᵀ,   r_{t,v} = R_t[v, :]

and J_tᵀ r_{t,v} is one backward of ⟨r_{t,v}, z_t⟩: V backwards per position, batched with vmap.
G = E_sequences[G_n], the same per-sequence average as the other strategies.

LiSSA (Koh & Liang 2017): I_0 = v, I_k = v + (I − (G + λ)/scale) I_{k−1} converges to
scale · (G + λ)⁻¹ v when scale exceeds the largest eigenvalue of G + λ. Each step uses one batch and
the Fisher-vector product G_batch v = (1/B) Σ_n DW̃_n ⟨DW̃_n, v⟩ with freshly sampled labels. The
stopping rule is ‖I_k − I_{k−1}‖ ≤ δ ‖I_k‖ (relative, so δ has no units).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from . import distributed
from .factors import Factors, sequence_gradients
from .hooks import Capture
from .model import TrackedLayer
from .objectives import batch_size, mix_seed, to_device
from .passes import BatchCapture, capture_pass, device_of, progress


def exact_ggn(model, layers: list[TrackedLayer], batches: Iterable, objective, *,
              show_progress: bool = True) -> tuple[Tensor, int, int]:
    """(G_PP averaged over sequences, number of sequences, number of tokens), in float64."""
    if not hasattr(objective, "output_logits"):
        raise TypeError(f"{type(objective).__name__} has no output_logits(model, batch); the exact strategy needs it")
    P = sum(layer.num_params for layer in layers)
    device = device_of(model)
    ggn_PP = torch.zeros(P, P, dtype=torch.float64, device=device)
    num_sequences = num_tokens = 0
    for _, _, batch in distributed.shard(progress(batches, "exact Gauss-Newton", show_progress), batch_size):
        batch = to_device(batch, device)
        with Capture(layers) as capture:
            logits_BTV, valid_BT = objective.output_logits(model, batch)
        mask_BT = objective.token_mask(batch)
        acts = [capture.activations(layer, mask_BT).double() for layer in layers]
        num_sequences += logits_BTV.shape[0]
        num_tokens += int(mask_BT.sum()) if mask_BT is not None else acts[0].shape[0] * acts[0].shape[1]
        for t in range(logits_BTV.shape[1]):
            if valid_BT[:, t].any():
                J_XP = _position_jacobian_rows(logits_BTV, valid_BT, t, capture, acts)
                ggn_PP += J_XP.T @ J_XP
    counts = torch.tensor([num_sequences, num_tokens], dtype=torch.float64, device=device)
    distributed.sum_reduce_([ggn_PP, counts])
    return ggn_PP / counts[0], int(counts[0]), int(counts[1])


def _position_jacobian_rows(logits_BTV: Tensor, valid_BT: Tensor, t: int, capture: Capture, acts: list[Tensor]) -> Tensor:
    """Rows (J_tᵀ r_{t,v})ᵀ for every sequence b and class v: [V·B, P]."""
    B, T, V = logits_BTV.shape
    p_BV = torch.softmax(logits_BTV[:, t].detach().double(), dim=-1)
    eye_VV = torch.eye(V, dtype=torch.float64, device=p_BV.device)
    R_BVV = p_BV.sqrt()[:, :, None] * (eye_VV - p_BV[:, None, :]) * valid_BT[:, t, None, None]
    grad_outputs_VBTV = torch.zeros(V, B, T, V, dtype=logits_BTV.dtype, device=logits_BTV.device)
    grad_outputs_VBTV[:, :, t, :] = R_BVV.permute(1, 0, 2).to(logits_BTV.dtype)
    outputs = capture.outputs()
    try:
        grads = torch.autograd.grad(logits_BTV, outputs, grad_outputs=grad_outputs_VBTV, retain_graph=True,
                                    is_grads_batched=True, allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one backward per class instead
        per_class = [torch.autograd.grad(logits_BTV, outputs, grad_outputs=grad_outputs_VBTV[v], retain_graph=True,
                                         allow_unused=True) for v in range(V)]
        grads = [None if per_class[0][i] is None else torch.stack([g[i] for g in per_class]) for i in range(len(outputs))]
    rows = []
    for output, g, a_BTI in zip(outputs, grads, acts):
        O = output.shape[-1]
        g_VBTO = torch.zeros(V, *a_BTI.shape[:2], O, dtype=torch.float64, device=a_BTI.device) if g is None \
            else g.reshape(V, B, -1, O).double()
        rows.append(torch.einsum("vbto,bti->vboi", g_VBTO, a_BTI).reshape(V * B, -1))
    return torch.cat(rows, dim=1)


# ----------------------------------------------------------------------------- LiSSA


def fisher_vector_product(V: dict[str, Tensor], item: BatchCapture) -> dict[str, Tensor]:
    """G_batch V = (1/B) Σ_n DW̃_n ⟨DW̃_n, V⟩ for every query's V (sampled-label gradients)."""
    grads = {name: sequence_gradients(item.grads[name].to(v.dtype), item.acts[name].to(v.dtype)) for name, v in V.items()}
    inner_QB = sum(V[name].flatten(1) @ DW_BOI.flatten(1).T for name, DW_BOI in grads.items())
    return {name: (inner_QB @ DW_BOI.flatten(1)).reshape(V[name].shape) / item.num_sequences for name, DW_BOI in grads.items()}


def _batches_forever(model, layers, batches, objective, seed: int):
    iteration = 0
    while True:
        # fresh labels each visit; every process walks the same batches (LiSSA is a baseline)
        for item in capture_pass(model, layers, batches, objective, loss="sampled", seed=mix_seed(seed, iteration),
                                 show_progress=False, shard=False):
            yield item
        iteration += 1


def _norm(V: dict[str, Tensor]) -> float:
    return math.sqrt(sum(float(v.double().square().sum()) for v in V.values()))


def estimate_lissa_scale(model, layers, batches, objective, damping: dict[str, float], *, seed: int = 0,
                         iterations: int = 20) -> float:
    """1.5 × (largest eigenvalue of the mini-batch G, by power iteration, + the largest damping)."""
    generator = torch.Generator().manual_seed(seed)
    device = device_of(model)
    V = {l.name: torch.randn(1, l.out_features, l.in_dim, generator=generator, dtype=torch.float64).to(device) for l in layers}
    stream = _batches_forever(model, layers, batches, objective, seed + 1)
    largest = 0.0
    for _ in range(iterations):
        norm = _norm(V)
        V = {name: v / norm for name, v in V.items()}
        GV = fisher_vector_product(V, next(stream))
        largest = max(largest, _norm(GV))
        V = GV
    return 1.5 * (largest + max(damping.values()))


def lissa_inverse_product(model, layers: list[TrackedLayer], batches: Iterable, objective, grads: dict[str, Tensor],
                          factors: Factors, *, show_progress: bool = True) -> dict[str, Tensor]:
    """(G + λ)⁻¹ ∇f for all queries at once, by the LiSSA recursion (float64)."""
    config = factors.config
    scale = factors.lissa_scale
    damping = {layer.name: layer.damping for layer in factors.layers}
    v = {name: g.double() for name, g in grads.items()}
    estimate = {name: g.clone() for name, g in v.items()}
    stream = _batches_forever(model, layers, batches, objective, config.seed + 7)
    bar = progress(range(config.lissa_max_iterations), "LiSSA", show_progress)
    for _ in bar:
        GV = fisher_vector_product(estimate, next(stream))
        updated = {name: v[name] + estimate[name] - (GV[name] + damping[name] * estimate[name]) / scale for name in v}
        change = _norm({name: updated[name] - estimate[name] for name in v})
        estimate = updated
        if change <= config.lissa_tolerance * _norm(estimate):
            break
    return {name: value / scale for name, value in estimate.items()}
