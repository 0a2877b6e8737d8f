"""Capture ā (layer inputs, bias column appended) and g = ∂loss/∂s (output gradients).

Shapes: B sequences, T positions, I in-features (+1 for the bias column), O out-features.
A layer applied to a [B, I] input (a classifier) is seen as T = 1.

No parameter needs `.grad`: `output_gradients` asks autograd for the gradients of the tracked
outputs only, so no weight gradient is ever computed.

Experts (model.py) have no module of their own to hook: while a capture is open, each experts
module with a tracked expert runs `experts.routed_forward`, which hands every projection's input
and output to the capture. Expert e's input and output on its routed tokens are scattered into
[B, T, ·] tensors that are zero on the tokens routed elsewhere, so ā and g of an expert look like
those of any layer and the engine downstream does not know the difference. That costs E/k times
the activation memory of a dense layer of the same size (E experts, k routed per token): the
zeros of the tokens routed elsewhere. It is the same order as the experts' own weights' share of
the model, and it keeps one code path for the covariances, the correction and the scores.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from .experts import routed_forward
from .model import TrackedLayer


class CaptureError(RuntimeError):
    """The forward pass did not go through the tracked layers as expected."""


class Capture:
    """Context manager: during a forward pass, record each tracked layer's input and output.

    >>> with Capture(layers) as capture:
    ...     loss = objective.train_loss(model, batch, sample_labels=True)
    >>> grads = capture.output_gradients(loss)        # {name: g_BTO}
    >>> a_BTI = capture.activations(name, mask_BT)    # ā with bias column, masked
    """

    def __init__(self, layers: list[TrackedLayer]):
        self.layers = layers
        self._inputs: dict[str, Tensor] = {}
        self._outputs: dict[str, Tensor] = {}
        self._token_shapes: dict[str, tuple[int, ...]] = {}  # (B, T) of a layer that sees its tokens flattened
        self._handles = []
        self._patched: list[tuple[nn.Module, object]] = []  # (experts module, its own forward attribute or None)

    def __enter__(self) -> "Capture":
        experts: dict[int, tuple[nn.Module, dict]] = {}
        shapes: dict[int, dict] = {}  # per block: {"BT": (B, T)} of its last forward
        for layer in self.layers:
            if layer.block is not None and id(layer.block) not in shapes:
                shapes[id(layer.block)] = shape = {}
                self._handles.append(layer.block.register_forward_pre_hook(functools.partial(_token_shape, shape),
                                                                           with_kwargs=True))
            if layer.expert is None:
                self._handles.append(layer.module.register_forward_hook(self._hook(layer, shapes.get(id(layer.block)))))
            else:
                experts.setdefault(id(layer.module), (layer.module, {}))[1][(layer.expert, layer.projection)] = layer
        for module, parts in experts.values():
            shape = shapes[id(next(iter(parts.values())).block)]
            self._patched.append((module, module.__dict__.get("forward")))
            module.forward = functools.partial(routed_forward, module, record=functools.partial(self._record, parts, shape))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, own_forward in self._patched:
            del module.forward
            if own_forward is not None:  # e.g. accelerate's hooks wrap forward per instance
                module.forward = own_forward
        self._patched.clear()

    def _record(self, parts: dict, shape: dict, expert: int, projection: str, a_nI: Tensor, s_nO: Tensor,
                token_n: Tensor) -> Tensor:
        """Scatter expert `expert`'s input and output on its routed tokens into [N, ·] (zeros elsewhere);
        the scattered output is the node the gradient is taken at, so the rest of the forward reads from it."""
        layer = parts.get((expert, projection))
        if layer is None:
            return s_nO
        if layer.name in self._outputs:
            raise CaptureError(f"layer {layer.name} ran twice in one forward pass; shared layers cannot be tracked")
        if "BT" not in shape:
            raise CaptureError(f"the experts of {layer.name} ran outside the block that holds them, on unknown tokens")
        N = math.prod(shape["BT"])
        self._inputs[layer.name] = a_nI.new_zeros(N, a_nI.shape[-1]).index_copy(0, token_n, a_nI.detach())
        s_NO = s_nO.new_zeros(N, s_nO.shape[-1]).index_copy(0, token_n, s_nO)
        if not s_NO.requires_grad:
            s_NO = s_NO.detach().requires_grad_(True)
        self._outputs[layer.name] = s_NO
        self._token_shapes[layer.name] = shape["BT"]
        return s_NO[token_n]

    def _hook(self, layer: TrackedLayer, shape: dict | None):
        name = layer.name

        def hook(module, inputs, output):
            if name in self._outputs:
                raise CaptureError(f"layer {name} ran twice in one forward pass; shared layers cannot be tracked")
            self._inputs[name] = inputs[0].detach()
            if not output.requires_grad:
                # Nothing upstream requires grad (e.g. frozen parameters): make this output a leaf
                # so that the gradient reaches it. Layers further on then have a graph as usual.
                output = output.detach().requires_grad_(True)
            self._outputs[name] = output
            if shape and output.dim() == 2 and output.shape[0] == math.prod(shape["BT"]) != shape["BT"][0]:
                self._token_shapes[name] = shape["BT"]  # the block's tokens, flattened (OPT's fc1)
            return output

        return hook

    def output_gradients(self, loss: Tensor, *, retain_graph: bool = False) -> dict[str, Tensor]:
        """g_BTO = ∂loss/∂s for every tracked layer, in one backward without weight gradients."""
        missing = [layer.name for layer in self.layers if layer.name not in self._outputs]
        if missing:
            raise CaptureError(f"tracked layer(s) not used by the forward pass: {', '.join(missing)}")
        outputs = [self._outputs[layer.name] for layer in self.layers]
        grads = torch.autograd.grad(loss, outputs, retain_graph=retain_graph, allow_unused=True)
        return {
            layer.name: self._as_BTX(layer.name, torch.zeros_like(out) if grad is None else grad)
            for layer, out, grad in zip(self.layers, outputs, grads)
        }

    def _as_BTX(self, name: str, x: Tensor) -> Tensor:
        shape = self._token_shapes.get(name)
        return _as_BTX(x if shape is None else x.reshape(*shape, x.shape[-1]))

    def outputs(self) -> list[Tensor]:
        return [self._outputs[layer.name] for layer in self.layers]

    def activations(self, layer: TrackedLayer, mask_BT: Tensor | None = None) -> Tensor:
        """ā_BTI: the layer input with a ones column when the layer has a bias, zero where masked."""
        a_BTI = self._as_BTX(layer.name, self._inputs[layer.name])
        if layer.has_bias:
            a_BTI = torch.cat([a_BTI, a_BTI.new_ones(a_BTI.shape[:-1] + (1,))], dim=-1)
        if mask_BT is not None:
            a_BTI = a_BTI * _check_mask(mask_BT, a_BTI)[..., None]
        return a_BTI


def _token_shape(shape: dict, block: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a MoE block: the (B, T) of its hidden states, which its experts see flattened."""
    hidden = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
    if not isinstance(hidden, Tensor):
        return
    shape["BT"] = tuple(hidden.shape[:-1])


def mask_gradient(g_BTO: Tensor, mask_BT: Tensor | None) -> Tensor:
    return g_BTO if mask_BT is None else g_BTO * _check_mask(mask_BT, g_BTO)[..., None]


def effective_mask(mask_BT: Tensor | None) -> Tensor | None:
    """None when every position is real: packed sequences then skip the masking multiplies."""
    return None if mask_BT is None or bool(mask_BT.all()) else mask_BT


def _as_BTX(x: Tensor) -> Tensor:
    if x.dim() == 2:
        return x[:, None, :]
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _check_mask(mask_BT: Tensor, x_BTX: Tensor) -> Tensor:
    if mask_BT.shape != x_BTX.shape[:2]:
        raise CaptureError(f"token mask of shape {tuple(mask_BT.shape)} does not match activations {tuple(x_BTX.shape[:2])}")
    return mask_BT.to(x_BTX.dtype)
