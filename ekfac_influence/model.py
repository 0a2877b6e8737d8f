"""Which layers are tracked, and a fingerprint that ties stored results to one model.

A tracked layer computes `s = W a + b` with `W` of shape O × I. `torch.nn.Linear` stores `W` as
O × I; Hugging Face's GPT-2 `Conv1D` stores it as I × O (`transposed=True`). Both are handled as
they are, without rewriting the model.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import torch
from torch import nn

try:  # transformers is a dependency, but the engine also works on plain PyTorch models
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

# Module names of the MLP (feed-forward) linears in the transformer families we know.
MLP_PATTERN = re.compile(
    r"(^|\.)(mlp|feed_forward|ffn|ff)\.(c_fc|c_proj|fc1|fc2|fc_in|fc_out|gate_proj|up_proj|down_proj|"
    r"dense_h_to_4h|dense_4h_to_h|w1|w2|w3|wi|wo|gate_up_proj)$"
)


class LayerSelectionError(ValueError):
    """Layer patterns matched nothing, or matched a module that cannot be tracked."""


@dataclass(frozen=True, eq=False)
class TrackedLayer:
    """A linear layer whose weight gradient is factored. `in_dim` counts the bias column."""

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    has_bias: bool
    transposed: bool  # weight stored I × O (GPT-2 Conv1D)

    @property
    def in_dim(self) -> int:
        return self.in_features + int(self.has_bias)

    @property
    def num_params(self) -> int:
        return self.out_features * self.in_dim

    def gradient_OI(self) -> torch.Tensor:
        """The parameter gradient (.grad) in the engine's O × I layout, bias as last column."""
        weight = self.module.weight.grad
        weight_OI = weight.T if self.transposed else weight
        if not self.has_bias:
            return weight_OI
        return torch.cat([weight_OI, self.module.bias.grad[:, None]], dim=1)


def _as_tracked(name: str, module: nn.Module) -> TrackedLayer | None:
    if isinstance(module, nn.Linear):
        return TrackedLayer(name, module, module.in_features, module.out_features, module.bias is not None, False)
    if Conv1D and isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return TrackedLayer(name, module, in_features, out_features, module.bias is not None, True)
    return None


def select_layers(model: nn.Module, patterns: tuple[str, ...] | None = None) -> list[TrackedLayer]:
    """Tracked layers in module order.

    patterns: regular expressions searched in module names. None = the MLP linears of every
    transformer block (the paper's choice); a model without such blocks tracks every Linear/Conv1D.
    """
    candidates = [layer for name, module in model.named_modules() if (layer := _as_tracked(name, module))]
    if not candidates:
        raise LayerSelectionError(f"{type(model).__name__} has no nn.Linear or Conv1D layer to track")
    if patterns is None:
        mlp = [layer for layer in candidates if MLP_PATTERN.search(layer.name)]
        return mlp or candidates
    compiled = [re.compile(pattern) for pattern in patterns]
    selected = [layer for layer in candidates if any(p.search(layer.name) for p in compiled)]
    for pattern in compiled:
        if not any(pattern.search(layer.name) for layer in candidates):
            examples = ", ".join(layer.name for layer in candidates[:6])
            raise LayerSelectionError(
                f"layer pattern {pattern.pattern!r} matches no Linear/Conv1D module; names look like: {examples}"
            )
    return selected


def fingerprint(model: nn.Module, layers: list[TrackedLayer] | None = None) -> str:
    """A short hash of the model's architecture and (sampled) weights, plus the tracked layers.

    Every parameter contributes its name, shape and up to 256 evenly strided values rounded to
    float16 (hashing every weight of a 7B model would take longer than the check is worth). A
    training step or another checkpoint changes the sampled values and so the fingerprint; an edit
    of a single entry that the sample skips does not.
    """
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            stride = max(1, flat.numel() // 256)
            sample = flat[::stride][:256].to("cpu", torch.float16).numpy().tobytes()
            digest.update(name.encode())
            digest.update(json.dumps(list(param.shape)).encode())
            digest.update(sample)
    if layers is not None:
        digest.update(json.dumps([[l.name, l.out_features, l.in_dim] for l in layers]).encode())
    return digest.hexdigest()[:16]
