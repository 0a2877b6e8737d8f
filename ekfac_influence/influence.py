"""The scoring stage: `compute_scores`, and the query gradients that the query stage shares.

    score(q, n) = ∇f_qᵀ (G + λI)⁻¹ ∇log p(z_n)       (positive = helpful; docs/design.md §1)

Query gradients are computed and preconditioned by the processes in turns (each its share of the
query batches), gathered on every process; then one pass over the training batches scores every
query from the same backward (`scores.BatchScorer`).

Shapes: Q queries, N training sequences, B batch, T positions, I in-features (+1 bias), O out-features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from . import distributed
from .config import ScoreConfig
from .factors import Factors, check_factors_match, sequence_gradients
from .model import TrackedLayer
from .objectives import Objective, at_least_float32
from .passes import capture_pass, device_of, evaluation_mode, require_reiterable
from .precondition import LowRank, compress, precondition
from .reference import lissa_inverse_product
from .refine import DampedGaussNewton, refine, refinement_batches
from .scores import BatchScorer, ScoreResult
from .storage import PassCheckpoint


def query_gradients(model, layers: list[TrackedLayer], query_batches: Iterable, objective: Objective,
                    *, combine: list[Tensor] | None = None, show_progress: bool = True) -> dict[str, Tensor]:
    """∇f_q per query and layer, {layer: V_QOI}; the processes split the batches, every process gets all.

    combine: as in `preconditioned_query_gradients`.
    """
    def finish(grads: dict[str, Tensor], index: int) -> dict[str, Tensor]:
        return grads if combine is None else _combined(grads, combine[index])

    return _split_queries(model, layers, query_batches, objective, finish, show_progress=show_progress)


def _combined(grads: dict[str, Tensor], M_QR: Tensor) -> dict[str, Tensor]:
    """∇f_q = Σ_r M_qr ∇row_r per layer."""
    return {name: torch.einsum("qr,roi->qoi", M_QR.to(V_ROI), V_ROI) for name, V_ROI in grads.items()}


def preconditioned_query_gradients(model, layers: list[TrackedLayer], factors: Factors, query_batches: Iterable,
                                   objective: Objective, *, dtype: torch.dtype = torch.float32,
                                   rank: int | None = None, combine: list[Tensor] | None = None,
                                   show_progress: bool = True) -> dict[str, Tensor | LowRank]:
    """{layer: P(∇f_q)} for every query, rank-k when `rank` is given.

    The processes split the query batches: each computes and preconditions its share, a batch at a
    time (so only rank-k factors pile up), and the results are gathered on every process, which
    then scores its own shard of the training sequences against all of them.
    combine: per batch, an [Q_b, R_b] matrix M turning the batch's row gradients into query gradients
    ∇f_q = Σ_r M_qr ∇row_r (a contrast is +1 and −1).
    """
    def finish(grads: dict[str, Tensor], index: int) -> dict:
        if combine is not None:
            grads = _combined(grads, combine[index])
        return precondition(grads, factors, dtype, rank=rank)

    if factors.owners is not None:
        return _preconditioned_by_owners(model, layers, factors, query_batches, objective, dtype=dtype, rank=rank,
                                         combine=combine, show_progress=show_progress)
    if factors.strategy == "exact":  # one dense solve for all queries rather than one per batch
        grads = query_gradients(model, layers, query_batches, objective, show_progress=show_progress)
        if combine is not None:
            grads = _combined(grads, torch.block_diag(*combine))
        return precondition(grads, factors, dtype, rank=rank)
    return _split_queries(model, layers, query_batches, objective, finish, show_progress=show_progress)


def _preconditioned_by_owners(model, layers: list[TrackedLayer], factors: Factors, query_batches: Iterable,
                              objective: Objective, *, dtype: torch.dtype, rank: int | None,
                              combine: list[Tensor] | None, show_progress: bool) -> dict[str, Tensor | LowRank]:
    """Sharded factors (each layer's held by one process): P(∇f_q) layer by layer on the layer's owner.

    Each process computes ∇f of its share of the query batches; then, one layer at a time, the
    layer's query gradients of every batch are brought together (broadcast from the processes that
    computed them), its owner preconditions them (rank-k when asked), and P travels from the owner
    to every process. No process holds another's factors; besides its own batches' gradients, a
    process holds one layer's gradients of all queries at a time.
    """
    local = _local_query_gradients(model, layers, query_batches, objective,
                                   lambda grads, i: grads if combine is None else _combined(grads, combine[i]),
                                   show_progress=show_progress)
    device, out = device_of(model), {}
    for layer in layers:
        merged = distributed.gather_tensors_by_key({i: (None, [grads.pop(layer.name)]) for i, grads in local.items()},
                                                   device)
        if not merged:
            raise ValueError("query_batches is empty: no query to score")
        mine = {}
        if factors.owners[layer.name] == distributed.rank():
            V_QOI = torch.cat([merged[i][1][0] for i in sorted(merged)])
            only = dataclasses.replace(factors, layers=[factors.layer(layer.name)], owners=None)
            P = precondition({layer.name: V_QOI}, only, dtype, rank=rank)[layer.name]
            mine = {layer.name: (isinstance(P, LowRank), _tensors(P))}
        del merged
        low_rank, tensors = distributed.gather_tensors_by_key(mine, device)[layer.name]
        out[layer.name] = LowRank(*tensors) if low_rank else tensors[0]
    return out


def _local_query_gradients(model, layers: list[TrackedLayer], query_batches: Iterable, objective: Objective, finish,
                           *, show_progress: bool) -> dict:
    """{batch index: finish({layer: ∇f_QOI}, batch index)} for this process's share of the query batches."""
    if distributed.lockstep():
        require_reiterable(query_batches, "query_batches (with a sharded model)")
    local = {}
    for item in capture_pass(model, layers, query_batches, objective, loss="measurement", desc="query gradients",
                             show_progress=show_progress):
        grads = {layer.name: sequence_gradients(at_least_float32(item.grads[layer.name]), at_least_float32(item.acts[layer.name]))
                 for layer in layers}
        local[item.index] = finish(grads, item.index)
    return local


def _split_queries(model, layers: list[TrackedLayer], query_batches: Iterable, objective: Objective, finish,
                   *, show_progress: bool) -> dict:
    """finish({layer: V_QOI}, batch index) for this process's share of the query batches, gathered in order.

    The results ({layer: dense tensor or LowRank}) travel as tensors (broadcast from their process),
    never pickled: dense query gradients of a large model are gigabytes.
    """
    local = _local_query_gradients(model, layers, query_batches, objective, finish, show_progress=show_progress)
    names = [layer.name for layer in layers]
    flat = {index: ([isinstance(result[n], LowRank) for n in names], [t for n in names for t in _tensors(result[n])])
            for index, result in local.items()}
    merged = distributed.gather_tensors_by_key(flat, device_of(model))
    if not merged:
        raise ValueError("query_batches is empty: no query to score")
    parts = []
    for index in sorted(merged):
        kinds, tensors = merged[index]
        tensors, result = iter(tensors), {}
        for name, low_rank in zip(names, kinds):
            result[name] = LowRank(next(tensors), next(tensors)) if low_rank else next(tensors)
        parts.append(result)
    return {name: _concat([part[name] for part in parts]) for name in names}


def _tensors(value: Tensor | LowRank) -> list[Tensor]:
    return [value.left_QOK, value.right_QIK] if isinstance(value, LowRank) else [value]


def _concat(parts: list) -> Tensor | LowRank:
    if isinstance(parts[0], LowRank):
        return LowRank(torch.cat([p.left_QOK for p in parts]), torch.cat([p.right_QIK for p in parts]))
    return torch.cat(parts)


def compute_scores(model: nn.Module, factors: Factors, query_batches: Iterable, train_batches: Iterable,
                   objective: Objective, config: ScoreConfig = ScoreConfig(), *, show_progress: bool = True) -> ScoreResult:
    """score(q, n) = ∇f_qᵀ (G + λI)⁻¹ ∇log p(z_n) for every query and training sequence (positive = helpful)."""
    layers = check_factors_match(factors, model)
    dtype = getattr(torch, config.compute_dtype)
    if factors.owners is not None and config.refine_steps > 0:
        raise ValueError("refinement needs every layer's factors on every process, and these factors are sharded "
                         "(each process holds its own layers): load them whole (Factors.load(path)) or set refine_steps to 0")
    with evaluation_mode(model):
        if factors.strategy == "lissa" or config.refine_steps > 0:
            grads = query_gradients(model, layers, query_batches, objective, show_progress=show_progress)
            if factors.strategy == "lissa":
                solved = lissa_inverse_product(model, layers, train_batches, objective, grads, factors,
                                               show_progress=show_progress)
            else:
                require_reiterable(train_batches, "train_batches")
                solved = refined_inverse_product(model, layers, factors, refinement_batches(train_batches, config.refine_batches),
                                                 objective, grads, config, show_progress=show_progress)
            preconditioned = {name: value.to(dtype) for name, value in solved.items()}
            if config.rank is not None:
                preconditioned = {name: compress(P, config.rank) for name, P in preconditioned.items()}
        else:
            preconditioned = preconditioned_query_gradients(model, layers, factors, query_batches, objective,
                                                            dtype=dtype, rank=config.rank, show_progress=show_progress)
        result = score_training_set(model, layers, preconditioned, train_batches, objective, config,
                                    show_progress=show_progress)
    result.num_train_sequences = config.train_size or result.scores.shape[-1]  # the training set scored, as query does
    return result


def refined_inverse_product(model, layers: list[TrackedLayer], factors: Factors, batches: Iterable,
                            objective: Objective, grads: dict[str, Tensor], config, *, show_progress: bool = True,
                            checkpoint: PassCheckpoint | None = None, name: str = "refine") -> dict[str, Tensor]:
    """(G + λ)⁻¹ ∇f refined from EK-FAC's answer by `config.refine_steps` preconditioned CG steps (`refine`).

    batches: the training batches of every step (re-iterable). config: a ScoreConfig or QueryConfig
    (refine_steps, refine_tolerance).
    """
    if factors.strategy in ("lissa", "exact"):
        raise ValueError(f"refinement starts from a factored curvature (ekfac, kfac, diagonal, identity); the "
                         f"{factors.strategy} strategy solves on its own: set refine_steps to 0")
    if distributed.lockstep():
        raise ValueError("refinement does not run with an FSDP-sharded model yet: set refine_steps to 0")
    operator = DampedGaussNewton(model, layers, factors, batches, objective)
    return refine(operator, factors, grads, steps=config.refine_steps, tolerance=config.refine_tolerance,
                  show_progress=show_progress, checkpoint=checkpoint, name=name)


def score_training_set(model, layers: list[TrackedLayer], preconditioned: dict, train_batches: Iterable,
                       objective: Objective, config: ScoreConfig, *, show_progress: bool = True) -> ScoreResult:
    """One pass over the training batches; every stored query is scored from the same backward."""
    scorer = BatchScorer(preconditioned, [l.name for l in layers], getattr(torch, config.compute_dtype),
                         per_token=config.per_token)
    local = {}
    for item in capture_pass(model, layers, train_batches, objective, loss="real", desc="scores",
                             show_progress=show_progress):
        for done in scorer.add(item):
            local[done.index] = (done.per_layer, done.tokens)
    for done in scorer.flush():
        local[done.index] = (done.per_layer, done.tokens)
    merged = distributed.gather_by_key(local)
    return _assemble(merged, [l.name for l in layers], config)


def _assemble(merged: dict, names: list[str], config: ScoreConfig) -> ScoreResult:
    order = sorted(merged)
    if not order:
        raise ValueError("train_batches is empty: no training sequence to score")
    per_layer = {name: torch.cat([merged[i][0][name] for i in order], dim=1) for name in names}
    scores = sum(per_layer.values())
    per_token = None
    if config.per_token:
        width = max(merged[i][1].shape[2] for i in order)
        per_token = torch.cat([torch.nn.functional.pad(merged[i][1], (0, width - merged[i][1].shape[2])) for i in order], dim=1)
    return ScoreResult(scores=scores, per_layer=per_layer if config.per_layer else None, per_token=per_token)
