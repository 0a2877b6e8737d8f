"""What a model family must tell the engine: its training loss, its measurement, its token mask.

Conventions (docs/design.md §1):
- train_loss L(z) = −Σ_t log p(z_t | z_<t), SUMMED over sequences and real tokens (not a mean).
- measurement f = Σ_{t ∈ completion} log p(c_t | p, c_<t), summed over the queries of a batch.
- Sampled labels (true Fisher = Gauss-Newton for softmax cross-entropy) come from uniforms keyed
  to (seed, sequence index, rank of the token among the sequence's real tokens), so the draws do
  not depend on batch size, padding or the number of processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
_CDF_CHUNK_ELEMENTS = 2**25  # float64 CDF rows sampled at once (256 MiB)


@runtime_checkable
class Objective(Protocol):
    def train_loss(self, model: nn.Module, batch: Any, *, sample_labels: bool, generator: "LabelSampler | None" = None) -> Tensor:
        """Loss summed over the sequences and tokens of the batch."""

    def measurement(self, model: nn.Module, batch: Any) -> Tensor:
        """f summed over the queries of the batch."""

    def token_mask(self, batch: Any) -> Tensor | None:
        """[B, T], 1 = real token; None = every position is real."""


class LabelSampler:
    """Uniform draws for label sampling, keyed to (seed, stream, draw, sequence index, token rank).

    Sequence `first_index + b` of a batch always gets the same uniforms, whatever the batch it sits
    in, and its k-th real token always gets the k-th draw, wherever padding puts it. `stream` keys a
    pass (the eigenvalue correction draws afresh, apart from the covariance pass) and `draw` one of
    several label samples per position; stream 0, draw 0 is the plain (seed, sequence) key.
    """

    def __init__(self, seed: int, first_index: int, *, stream: int = 0, draw: int = 0):
        self.seed = seed
        self.first_index = first_index
        self.stream, self.draw = stream, draw

    def key(self, index: int) -> int:
        key = mix_seed(self.seed, index)
        return key if (self.stream, self.draw) == (0, 0) else mix_seed(key, (self.stream << 20) + self.draw + 1)

    def uniforms(self, valid_BT: Tensor) -> Tensor:
        valid_BT = valid_BT.bool().cpu()
        u_BT = torch.zeros(valid_BT.shape, dtype=torch.float64)
        for b in range(valid_BT.shape[0]):
            generator = torch.Generator().manual_seed(self.key(self.first_index + b))
            count = int(valid_BT[b].sum())
            u_BT[b, valid_BT[b]] = torch.rand(count, generator=generator, dtype=torch.float64)
        return u_BT

    def sample(self, logits_BTV: Tensor, valid_BT: Tensor) -> Tensor:
        """Labels y_BT ~ softmax(logits) by inverse CDF in float64; IGNORE_INDEX where not valid.

        float64 because a float32 cumulative sum over a 128k vocabulary misses 1 by ~1e-5, which
        shifts every draw near the top of the CDF. Rows are done in chunks of ≤ 2^25 elements.
        """
        u_BT = self.uniforms(valid_BT).to(logits_BTV.device)
        V = logits_BTV.shape[-1]
        logits_NV, u_N = logits_BTV.detach().reshape(-1, V), u_BT.reshape(-1)
        labels_N = torch.empty(u_N.shape, dtype=torch.long, device=logits_BTV.device)
        step = max(1, _CDF_CHUNK_ELEMENTS // V)
        for start in range(0, len(u_N), step):
            cdf_nV = torch.softmax(logits_NV[start : start + step].double(), dim=-1).cumsum(-1)
            labels_N[start : start + step] = torch.searchsorted(cdf_nV, u_N[start : start + step, None]).squeeze(-1)
        labels_BT = labels_N.reshape(u_BT.shape).clamp_max(V - 1)
        return torch.where(valid_BT.bool(), labels_BT, torch.full_like(labels_BT, IGNORE_INDEX))


def fisher_losses(logits_BTV: Tensor, valid_BT: Tensor, sampler: LabelSampler, *, draws: int = 1,
                  expected: bool = False) -> list[Tensor]:
    """Losses L_j whose output gradients g_j give the Gauss-Newton: Σ_j g_j g_jᵀ ≈ Jᵀ H J.

    draws: k sampled labels per position, L_j = CE(z, y_j) / √k, so that Σ_j g_j g_jᵀ is the mean of
    k independent Fisher samples (k× the backward cost, 1/k the label noise).
    expected: the exact expectation over the V classes, L_y = Σ_{b,t} √p_y · (−log p_y), whose
    gradient √p_y (p − e_y) gives Σ_y g_y g_yᵀ = Jᵀ (diag p − p pᵀ) J exactly. Exact only with one
    prediction per sequence (classification): with several, positions' terms mix.
    """
    if expected:
        logp_BTV = torch.log_softmax(at_least_float32(logits_BTV), dim=-1)
        weight_BTV = (logp_BTV.detach().exp() * valid_BT[..., None]).sqrt()
        return [-(weight_BTV[..., y] * logp_BTV[..., y]).sum() for y in range(logits_BTV.shape[-1])]
    scale = draws ** -0.5
    return [_summed_cross_entropy(logits_BTV, LabelSampler(sampler.seed, sampler.first_index, stream=sampler.stream,
                                                           draw=j).sample(logits_BTV, valid_BT)) * scale
            for j in range(draws)]


def mix_seed(seed: int, index: int) -> int:
    # splitmix64-style mixing so neighbouring (seed, index) pairs give unrelated streams
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def at_least_float32(x: Tensor) -> Tensor:
    """x in float32, or float64 when it is already: the working precision of every sum."""
    return x if x.dtype == torch.float64 else x.float()


def _summed_cross_entropy(logits_BTV: Tensor, labels_BT: Tensor) -> Tensor:
    return F.cross_entropy(at_least_float32(logits_BTV.reshape(-1, logits_BTV.shape[-1])), labels_BT.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


class CausalLMObjective:
    """Hugging Face causal LMs. Batches: {"input_ids", "attention_mask", "labels"} ([B, T] each).

    `labels` follow Hugging Face: the label of position t is the token at t (the model shifts), and
    −100 marks positions that are not predicted (padding; prompt tokens of a query). Without
    `labels`, every real token after the first is predicted.
    """

    def logits(self, model: nn.Module, batch: dict) -> tuple[Tensor, Tensor]:
        """(logits_BTV of positions that predict a token, their labels_BT), shifted by one."""
        mask = batch.get("attention_mask")
        position_ids = batch.get("position_ids")
        if position_ids is None and mask is not None and not bool(mask[:, 0].all()):
            # left padding: number the real tokens from 0, as for the unpadded sequence
            position_ids = (mask.long().cumsum(1) - 1).clamp_min(0)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": mask}
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        logits = model(**inputs).logits
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
        labels = labels[:, 1:]
        if mask is not None:
            # a pad position predicts nothing (with left padding it precedes the first token), and no
            # position predicts a pad, whatever labels the caller gave there
            labels = labels.masked_fill((mask[:, :-1] == 0) | (mask[:, 1:] == 0), IGNORE_INDEX)
        return logits[:, :-1], labels

    def train_loss(self, model, batch, *, sample_labels: bool, generator: LabelSampler | None = None) -> Tensor:
        logits_BTV, labels_BT = self.logits(model, batch)
        if sample_labels:
            labels_BT = _sampler(generator).sample(logits_BTV, labels_BT != IGNORE_INDEX)
        return _summed_cross_entropy(logits_BTV, labels_BT)

    def measurement(self, model, batch) -> Tensor:
        logits_BTV, labels_BT = self.logits(model, batch)
        return -_summed_cross_entropy(logits_BTV, labels_BT)

    def token_mask(self, batch) -> Tensor | None:
        mask = batch.get("attention_mask")
        return None if mask is None else mask

    def output_logits(self, model, batch) -> tuple[Tensor, Tensor]:
        """For the exact Gauss-Newton: logits_BTV and the mask of positions in the loss."""
        logits_BTV, labels_BT = self.logits(model, batch)
        return logits_BTV, labels_BT != IGNORE_INDEX


class ClassificationObjective:
    """Small classifiers. Batches: (x, y) with model(x) = logits [B, C]; f = log p(y | x)."""

    def train_loss(self, model, batch, *, sample_labels: bool, generator: LabelSampler | None = None) -> Tensor:
        x, y = batch
        logits_BC = model(x)
        if sample_labels:
            valid = torch.ones(y.shape[0], 1, dtype=torch.bool, device=y.device)
            y = _sampler(generator).sample(logits_BC[:, None, :], valid)[:, 0]
        return F.cross_entropy(at_least_float32(logits_BC), y, reduction="sum")

    def measurement(self, model, batch) -> Tensor:
        x, y = batch
        return -F.cross_entropy(at_least_float32(model(x)), y, reduction="sum")

    def token_mask(self, batch) -> Tensor | None:
        return None

    def output_logits(self, model, batch) -> tuple[Tensor, Tensor]:
        x, y = batch
        logits_BC = model(x)
        return logits_BC[:, None, :], torch.ones(y.shape[0], 1, dtype=torch.bool, device=y.device)


def _sampler(generator: LabelSampler | None) -> LabelSampler:
    return generator if generator is not None else LabelSampler(seed=0, first_index=0)


def batch_size(batch: Any) -> int:
    """Number of sequences in a batch: the leading size of its first tensor."""
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return batch_size(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)):
        return batch_size(batch[0])
    raise TypeError(f"cannot find the batch size of a {type(batch).__name__}; use tensors, dicts or tuples of tensors")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch
