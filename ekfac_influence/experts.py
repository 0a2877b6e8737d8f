"""Mixture-of-experts layers as transformers 5 stores them: each expert's linears as slices of stacked weights.

An experts module (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, ...) holds `gate_up_proj`
[E, 2·F, H] and `down_proj` [E, H, F] as parameters, not as `nn.Linear` modules. Token n, routed to
expert e with routing weight w_{n,e} (its top-k), gets

    y_n = Σ_{e ∈ top-k(n)} w_{n,e} · W_down[e] (act(gate) ⊙ up),   (gate, up) = W_gate_up[e] x_n

so each `W_gate_up[e]` and `W_down[e]` is a linear layer `s = W a` applied to the tokens routed to
e. `routed_forward` is that forward written out (as transformers' eager implementation does), with
a call to `record` on every projection's input and output, so that its caller can capture them.

Shapes: N tokens (batch × positions, flattened), K routed experts per token (top-k), H hidden,
F an expert's intermediate size, n the tokens routed to one expert, I and O a projection's in- and
out-features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

PROJECTIONS = ("gate_up_proj", "down_proj")  # in the order a token goes through them

# record(expert, projection, a_nI, s_nO, token_n) -> the output to continue with (s_nO itself, or a tensor equal to it)
Record = Callable[[int, str, Tensor, Tensor, Tensor], Tensor]


def is_stacked_experts(module: nn.Module) -> bool:
    """Whether `module` holds experts as stacked 3-D `gate_up_proj` and `down_proj` weights."""
    return all(isinstance(getattr(module, name, None), nn.Parameter) and getattr(module, name).dim() == 3
               for name in PROJECTIONS) and isinstance(getattr(module, "num_experts", None), int)


def stacked_3d_parameters(model: nn.Module) -> list[str]:
    """Names of the 3-D parameters of experts modules: stacked expert weights, recognised or not."""
    return [name for name, param in model.named_parameters() if param.dim() == 3 and "expert" in name]


def unsupported_layout(module: nn.Module) -> str | None:
    """Why this experts module cannot be tracked (a layout `routed_forward` does not implement), or None.

    Supported: transformers' default layout (gate and up concatenated, weights stored O × I, no
    biases, no norm after each expert), that of Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V2/V3.
    """
    flags = {"is_transposed": False, "has_bias": False, "has_post_expert_norm": False, "is_concatenated": True,
             "has_gate": True}
    odd = [f"{flag}={getattr(module, flag)}" for flag, usual in flags.items() if getattr(module, flag, usual) != usual]
    if odd:
        return f"{type(module).__name__} stores its experts in another layout ({', '.join(odd)})"
    if not hasattr(module, "act_fn"):
        return f"{type(module).__name__} has no act_fn"
    return None


def projection_shape(module: nn.Module, projection: str) -> tuple[int, int]:
    """(O, I) of one expert's projection: the stacked weight is [E, O, I]."""
    _, O, I = getattr(module, projection).shape
    return O, I


def routed_forward(experts: nn.Module, hidden_NH: Tensor, top_k_index_NK: Tensor, top_k_weights_NK: Tensor, *,
                   record: Record) -> Tensor:
    """transformers' eager experts forward, with `record` on each projection of each expert.

    Every expert is visited, routed tokens or not (an expert with none records empty tensors), so
    that a capture sees every tracked part in every forward pass. The routing weight multiplies the
    expert's output after `down_proj`: the gradient of `down_proj`'s output includes it.
    """
    final_NH = torch.zeros_like(hidden_NH)
    for e in range(experts.num_experts):
        token_n, k_n = torch.where(top_k_index_NK == e)
        x_nH = hidden_NH[token_n]
        s_nO = record(e, "gate_up_proj", x_nH, F.linear(x_nH, experts.gate_up_proj[e]), token_n)
        h_nF = apply_gate(experts, s_nO)
        y_nH = record(e, "down_proj", h_nF, F.linear(h_nF, experts.down_proj[e]), token_n)
        y_nH = y_nH * top_k_weights_NK[token_n, k_n, None]
        final_NH.index_add_(0, token_n, y_nH.to(final_NH.dtype))
    return final_NH


def apply_gate(experts: nn.Module, gate_up_nO: Tensor) -> Tensor:
    """act(gate) ⊙ up, gate and up the two halves of gate_up_proj's output (the module's own rule if it has one)."""
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(gate_up_nO)
    gate_nF, up_nF = gate_up_nO.chunk(2, dim=-1)
    return experts.act_fn(gate_nF) * up_nF
