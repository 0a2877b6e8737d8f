"""Capture ā (layer inputs, bias column appended) and g = ∂loss/∂s (output gradients).

Shapes: B sequences, T positions, I in-features (+1 for the bias column), O out-features.
A layer applied to a [B, I] input (a classifier) is seen as T = 1.

No parameter needs `.grad`: `output_gradients` asks autograd for the gradients of the tracked
outputs only, so no weight gradient is ever computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

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
        self._handles = []

    def __enter__(self) -> "Capture":
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._hook(layer.name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if name in self._outputs:
                raise CaptureError(f"layer {name} ran twice in one forward pass; shared layers cannot be tracked")
            self._inputs[name] = inputs[0].detach()
            if not output.requires_grad:
                # Nothing upstream requires grad (e.g. frozen parameters): make this output a leaf
                # so that the gradient reaches it. Layers further on then have a graph as usual.
                output = output.detach().requires_grad_(True)
            self._outputs[name] = output
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
            layer.name: _as_BTX(torch.zeros_like(out) if grad is None else grad)
            for layer, out, grad in zip(self.layers, outputs, grads)
        }

    def outputs(self) -> list[Tensor]:
        return [self._outputs[layer.name] for layer in self.layers]

    def activations(self, layer: TrackedLayer, mask_BT: Tensor | None = None) -> Tensor:
        """ā_BTI: the layer input with a ones column when the layer has a bias, zero where masked."""
        a_BTI = _as_BTX(self._inputs[layer.name])
        if layer.has_bias:
            a_BTI = torch.cat([a_BTI, a_BTI.new_ones(a_BTI.shape[:-1] + (1,))], dim=-1)
        if mask_BT is not None:
            a_BTI = a_BTI * _check_mask(mask_BT, a_BTI)[..., None]
        return a_BTI


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
