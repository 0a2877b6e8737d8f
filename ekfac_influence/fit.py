"""The fitting stage: `fit_factors` passes over the training data and fits the curvature (docs/design.md §1).

Each pass (covariances, eigenvalue correction, diagonal) keeps local sums per process and meets the
other processes once, in one sum-reduce at its end; the math of each step lives in `factors`, the
reference curvatures (exact Gauss-Newton, LiSSA's scale) in `reference`.

Sharded (`factors.shard: auto`, several processes, kfac/ekfac): each layer has one owner
(`assign_owners`, greedy by bytes); a pass's sums are reduced to each layer's owner only, the owner
decomposes it, and for the correction pass every process receives each layer's eigenvectors in the
pass's working dtype, dropped again at its end. The returned factors hold the owned layers only.

Shapes: N training sequences, B batch, T positions, I in-features (+1 bias), O out-features.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from . import distributed
from .config import FactorConfig
from .factors import (BlockDiagonal, Factors, LayerFactors, add_covariance, assign_owners, block_slices, blocked_covariance,
                      damping_for, eigendecompose, factor_blocks, flatten_blocks, parts,
                      rotated_gradients, sequence_gradients, unflatten_blocks)
from .model import TrackedLayer, fingerprint, select_layers
from .objectives import Objective, at_least_float32, batch_size
from .passes import capture_pass, check_finite, device_of, evaluation_mode, require_reiterable
from .plan import factor_bytes, layer_groups
from .reference import estimate_lissa_scale, exact_ggn
from .storage import PassCheckpoint

_SEQUENCE_CHUNK_ELEMENTS = 2**27  # bound on the per-sequence gradients formed at once

# Bytes of factor tensors this process held at the end of each step of the last kfac/ekfac fit
# (measured: the sum over the tensors actually held; with groups of layers, the largest group's),
# for scripts/shard_memory.py and its tests; `plan.plan_fit` predicts them.
HELD_BYTES: dict[str, int] = {}
# Wall seconds of each step of the last kfac/ekfac fit in this process (run.fit records them with the factors)
STEP_SECONDS: dict[str, float] = {}


def fit_factors(model: nn.Module, train_batches: Iterable, objective: Objective,
                config: FactorConfig = FactorConfig(), *, show_progress: bool = True,
                checkpoint: PassCheckpoint | None = None) -> Factors:
    """Fit the curvature of `config.strategy` on the training batches (docs/design.md §1).

    checkpoint: where the covariance and eigenvalue-correction passes keep their partial sums, so
    that a fit killed midway resumes from its last save (with the same batches and processes).
    """
    layers = select_layers(model, config.layers)
    require_reiterable(train_batches, "train_batches")
    owners = layer_owners(layers, config)
    STEP_SECONDS.clear()
    with evaluation_mode(model):
        if config.strategy == "identity":
            num_sequences, num_tokens = count_sequences(train_batches), 0
            fitted = [LayerFactors(l.name, l.out_features, l.in_dim) for l in layers]
            extra = {}
        elif config.strategy == "exact":
            fitted, num_sequences, num_tokens, extra = _fit_exact(model, layers, train_batches, objective, config, show_progress)
        elif config.strategy in ("diagonal", "lissa"):
            fitted, num_sequences, num_tokens = collect_diagonal(model, layers, train_batches, objective, config, show_progress)
            extra = {}
            if config.strategy == "lissa":
                damping = {f.name: f.damping for f in fitted}
                extra["lissa_scale"] = config.lissa_scale or estimate_lissa_scale(
                    model, layers, train_batches, objective, damping, seed=config.seed)
        else:
            groups = layer_groups(layers, config.memory_budget_gb, config)
            fitted, extra = [], {}
            HELD_BYTES.clear()
            for number, group in enumerate(groups):
                if len(groups) > 1:
                    distributed.print0(f"layer group {number + 1}/{len(groups)}: {len(group)} layers")
                part = None if checkpoint is None or len(groups) == 1 else checkpoint.child(f"group{number}")
                group_fitted, num_sequences, num_tokens = _fit_kronecker(model, group, train_batches, objective, config,
                                                                         show_progress, part if len(groups) > 1 else checkpoint,
                                                                         owners)
                # off the device before the next group: the budget is per group
                fitted += [layer.to(torch.float64, "cpu") for layer in group_fitted] if len(groups) > 1 else group_fitted
    for layer in fitted:
        for key, value in layer.tensors().items():
            check_finite(f"factor {key}", {layer.name: value}, "the fitted factors")
        if layer.lambda_OI is not None:
            layer.damping = damping_for(layer.lambda_OI, config)
    if owners is not None:  # each owner's dampings to every process (the manifest lists them all)
        damping = distributed.gather_by_key({l.name: l.damping for l in fitted if l.lambda_OI is not None})
        for layer in fitted:
            layer.damping = damping[layer.name]
    dtype = getattr(torch, config.factor_dtype)
    return Factors(
        strategy=config.strategy,
        layers=[layer.to(dtype, "cpu") for layer in fitted],
        fingerprint=fingerprint(model, layers),
        config=config,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        ggn_PP=extra.get("ggn_PP"),
        lissa_scale=extra.get("lissa_scale"),
        owners=owners,
    )


def layer_owners(layers: list[TrackedLayer], config: FactorConfig, world: int | None = None) -> dict[str, int] | None:
    """{layer: owning process} when the factors are sharded (shard "auto", world > 1, kfac/ekfac), else None."""
    world = distributed.world() if world is None else world
    if config.shard == "none" or world == 1 or config.strategy not in ("kfac", "ekfac"):
        return None
    return assign_owners({l.name: factor_bytes(l, config) for l in layers}, world)


def held_bytes(values) -> int:
    """Bytes of the tensors in `values` (tensors, BlockDiagonals, LayerFactors, or None), as held."""
    total = 0
    for value in values:
        if isinstance(value, LayerFactors):
            total += held_bytes(value.tensors().values())
        elif value is not None:
            total += sum(t.numel() * t.element_size() for t in parts(value))
    return total


def _lap(step: str, started: float) -> float:
    """Add the seconds since `started` to STEP_SECONDS[step] (summed over groups of layers); returns now."""
    now = time.perf_counter()
    STEP_SECONDS[step] = STEP_SECONDS.get(step, 0.0) + now - started
    return now


def _record(step: str, values) -> None:
    """Note the bytes held at `step`: the largest over groups of layers (a group's factors leave the device after it)."""
    HELD_BYTES[step] = max(HELD_BYTES.get(step, 0), held_bytes(values))


def _fit_kronecker(model, layers: list[TrackedLayer], batches, objective, config: FactorConfig, show_progress: bool,
                   checkpoint: PassCheckpoint | None, owners: dict[str, int] | None = None
                   ) -> tuple[list[LayerFactors], int, int]:
    """kfac / ekfac for a set of layers: the covariance pass, eigendecompositions, the correction pass."""
    started = time.perf_counter()
    fitted, num_sequences, num_tokens = collect_covariances(model, layers, batches, objective, config, show_progress,
                                                            checkpoint, owners)
    started = _lap("covariances", started)
    eigendecompose_layers(fitted, config, owners)
    _record("eigendecomposed", fitted)
    started = _lap("eigendecomposition", started)
    if config.strategy == "kfac":
        tokens_per_sequence = num_tokens / num_sequences
        for layer in fitted:
            if layer.eigA_I is not None:
                layer.lambda_OI = tokens_per_sequence * torch.outer(layer.eigS_O, layer.eigA_I)
    else:
        correct_eigenvalues(model, layers, fitted, batches, objective, config, show_progress, checkpoint, owners)
        _lap("eigenvalue correction", started)
    _record("fitted", fitted)
    return fitted, num_sequences, num_tokens


def eigendecompose_layers(fitted: list[LayerFactors], config: FactorConfig, owners: dict[str, int] | None = None) -> None:
    """Eigendecompose A and S of every layer, the layers divided among the processes.

    Process r decomposes layers r, r + world, ...; then each layer's eigenvectors and eigenvalues
    are broadcast from the process that computed them (the matrices are identical everywhere after
    the covariance pass's reduce, so the results equal a single process's). Sharded (`owners`):
    each owner decomposes its own layers and keeps them; nothing travels.
    """
    world, rank = distributed.world(), distributed.rank()
    if owners is not None:
        for layer in fitted:
            if owners[layer.name] == rank:
                layer.eigA_I, layer.QA_II = eigendecompose(layer.A_II)
                layer.eigS_O, layer.QS_OO = eigendecompose(layer.S_OO)
        return
    for i, layer in enumerate(fitted):
        if i % world == rank:
            layer.eigA_I, layer.QA_II = eigendecompose(layer.A_II)
            layer.eigS_O, layer.QS_OO = eigendecompose(layer.S_OO)
        else:
            layer.eigA_I, layer.QA_II = _placeholder(layer.A_II)
            layer.eigS_O, layer.QS_OO = _placeholder(layer.S_OO)
    if world > 1:
        for i, layer in enumerate(fitted):
            tensors = [layer.eigA_I, *parts(layer.QA_II), layer.eigS_O, *parts(layer.QS_OO)]
            distributed.broadcast_tensors_(tensors, src=i % world)


def _placeholder(cov: Tensor | BlockDiagonal) -> tuple[Tensor, Tensor | BlockDiagonal]:
    """Empty eigenvalues and eigenvectors shaped like those of `cov`, to be filled by a broadcast."""
    values = torch.empty(cov.shape[0], dtype=torch.float64, device=cov.device)
    if isinstance(cov, BlockDiagonal):
        return values, BlockDiagonal([torch.empty_like(block, dtype=torch.float64) for block in cov.blocks])
    return values, torch.empty_like(cov, dtype=torch.float64)


def count_sequences(batches: Iterable) -> int:
    return sum(batch_size(batch) for batch in batches)


def collect_covariances(model, layers: list[TrackedLayer], batches, objective, config: FactorConfig,
                        show_progress: bool = True, checkpoint: PassCheckpoint | None = None,
                        owners: dict[str, int] | None = None) -> tuple[list[LayerFactors], int, int]:
    """A = E_tokens[ā āᵀ], S = E_tokens[g gᵀ] with g from the sampled-label loss; one reduce per pass.

    Running sums in `config.accumulate_dtype`; the means returned in float64. With `owners`, each
    layer's sums are reduced to its owner only and the other processes keep no tensors of it.
    """
    done_name = "covariances.done" if owners is None else "covariances.owned"  # sharded: each owner saves its own
    done = _load(checkpoint, done_name)
    if done is not None:
        tensors, meta = done
        return [LayerFactors(l.name, l.out_features, l.in_dim, A_II=tensors.get(f"A/{l.name}"),
                             S_OO=tensors.get(f"S/{l.name}")) for l in layers], meta["num_sequences"], meta["num_tokens"]
    dtype = getattr(torch, config.accumulate_dtype)
    (sums_A, sums_S), num_sequences, num_tokens, start = _resume(checkpoint, "covariances", layers, ("A", "S"), model)
    for item in capture_pass(model, layers, batches, objective, desc="covariances", show_progress=show_progress,
                             start=start, **label_draws(config, "covariances")):
        num_sequences += item.num_sequences
        num_tokens += item.num_tokens
        for layer in layers:
            sums_A[layer.name] = add_covariance(sums_A[layer.name], item.acts[layer.name].flatten(0, 1),
                                                factor_blocks(layer.in_dim, config), dtype)
            sums_S[layer.name] = add_covariance(sums_S[layer.name], item.grads[layer.name].flatten(0, 1),
                                                factor_blocks(layer.out_features, config), dtype)
        _save_partial(checkpoint, "covariances", item.index + 1, {"A": sums_A, "S": sums_S}, num_sequences, num_tokens)
        del item  # not held while the next batch is captured
    factors = ([_zeros_if_none(sums_A, l.name, (l.in_dim, l.in_dim), model, factor_blocks(l.in_dim, config), dtype)
                for l in layers]
               + [_zeros_if_none(sums_S, l.name, (l.out_features, l.out_features), model,
                                 factor_blocks(l.out_features, config), dtype) for l in layers])
    _record("covariance pass: local sums", factors)
    owned_by = None if owners is None else [owners[l.name] for l, f in zip(layers + layers, factors) for _ in parts(f)]
    num_sequences, num_tokens = _reduce_counts([t for f in factors for t in parts(f)], num_sequences, num_tokens,
                                               owned_by)
    del factors
    rank = distributed.rank()
    fitted = [LayerFactors(l.name, l.out_features, l.in_dim, A_II=_mean(sums_A, l.name, num_tokens),
                           S_OO=_mean(sums_S, l.name, num_tokens)) if owners is None or owners[l.name] == rank
              else LayerFactors(l.name, l.out_features, l.in_dim) for l in layers]
    sums_A.clear(), sums_S.clear()
    _record("covariances reduced", fitted)
    if checkpoint is not None:
        _save(checkpoint, done_name, {**{f"A/{f.name}": f.A_II for f in fitted if f.A_II is not None},
                                      **{f"S/{f.name}": f.S_OO for f in fitted if f.S_OO is not None}},
              {"num_sequences": num_sequences, "num_tokens": num_tokens})
    return fitted, num_sequences, num_tokens


def _mean(sums: dict, name: str, count: int):
    """A running sum divided by its count, in float64 (the eigendecomposition's precision)."""
    return sums[name].to(torch.float64) / count


def correct_eigenvalues(model, layers: list[TrackedLayer], fitted: list[LayerFactors], batches, objective,
                        config: FactorConfig, show_progress: bool = True, checkpoint: PassCheckpoint | None = None,
                        owners: dict[str, int] | None = None) -> None:
    """EK-FAC: Λ = E_sequences[(Q_Sᵀ DW_n Q_A)²], with labels drawn afresh (their own stream of draws).

    Every process rotates its own sequences' gradients of every layer, so with `owners` each layer's
    eigenvectors are first broadcast from its owner (in the pass's working dtype) and dropped after
    the pass; Λ's sums are reduced to the owners only.
    """
    by_name = {f.name: f for f in fitted}
    dtype = getattr(torch, config.accumulate_dtype)
    rotations = _eigenvectors_everywhere(model, fitted, owners, config)
    (sums,), num_sequences, _, start = _resume(checkpoint, "correction", layers, ("lambda",), model)
    for item in capture_pass(model, layers, batches, objective, desc="eigenvalue correction",
                             show_progress=show_progress, start=start, **label_draws(config, "correction")):
        num_sequences += item.num_sequences
        for layer in layers:
            g_BTO = at_least_float32(item.grads[layer.name])
            QS_OO, QA_II = (Q.to(g_BTO.device, g_BTO.dtype) for Q in rotations[layer.name])
            part_OI = _sum_over_sequences(
                lambda g, a: rotated_gradients(g, a, QS_OO, QA_II, config.correction_order)[0].square(),
                g_BTO, at_least_float32(item.draw_acts(layer.name)), layer).to(dtype)
            sums[layer.name] = part_OI if sums[layer.name] is None else sums[layer.name] + part_OI
        _save_partial(checkpoint, "correction", item.index + 1, {"lambda": sums}, num_sequences, 0)
        del item, g_BTO  # not held while the next batch is captured
    tensors = [_zeros_if_none(sums, l.name, (l.out_features, l.in_dim), model, dtype=dtype) for l in layers]
    # the pass's peak: the factors held, its local sums, and the eigenvectors of layers owned elsewhere
    _record("correction pass: local sums and eigenvectors",
            fitted + tensors + [Q for l in layers if by_name[l.name].QA_II is None for Q in rotations[l.name]])
    num_sequences, _ = _reduce_counts(tensors, num_sequences, 0, None if owners is None else [owners[l.name] for l in layers])
    del tensors, rotations
    for layer in layers:
        if owners is None or owners[layer.name] == distributed.rank():
            by_name[layer.name].lambda_OI = _mean(sums, layer.name, num_sequences)
    sums.clear()


def _eigenvectors_everywhere(model, fitted: list[LayerFactors], owners: dict[str, int] | None,
                             config: FactorConfig) -> dict[str, tuple]:
    """{layer: (Q_S, Q_A)} for every layer on this process: its own, or (sharded) broadcast from the
    owner in the working dtype of the pass (at least float32: what the rotations compute in anyway)."""
    if owners is None:
        return {f.name: (f.QS_OO, f.QA_II) for f in fitted}
    device = device_of(model)
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    rotations = {}
    for f in fitted:
        if f.QS_OO is not None:  # the owner sends a copy and keeps rotating with its own, as unsharded
            distributed.broadcast_tensors_(parts(f.QS_OO.to(device, dtype)) + parts(f.QA_II.to(device, dtype)),
                                           src=owners[f.name])
            rotations[f.name] = (f.QS_OO, f.QA_II)
            continue
        QS, QA = (_empty_factor(size, factor_blocks(size, config), device, dtype) for size in (f.out_dim, f.in_dim))
        distributed.broadcast_tensors_(parts(QS) + parts(QA), src=owners[f.name])
        rotations[f.name] = (QS, QA)
    return rotations


def _empty_factor(size: int, blocks: int, device, dtype: torch.dtype) -> Tensor | BlockDiagonal:
    """An uninitialised size × size factor, or its diagonal blocks, to be filled by a broadcast."""
    if blocks == 1:
        return torch.empty(size, size, device=device, dtype=dtype)
    return BlockDiagonal([torch.empty(b.stop - b.start, b.stop - b.start, device=device, dtype=dtype)
                          for b in block_slices(size, blocks)])


def _resume(checkpoint: PassCheckpoint | None, name: str, layers: list[TrackedLayer], groups: tuple[str, ...], model):
    """(per group {layer: local sum or None}, sequences, tokens, next batch) of a saved partial pass."""
    sums = tuple({l.name: None for l in layers} for _ in groups)
    state = _load(checkpoint, name)
    if state is None:
        return sums, 0, 0, 0
    tensors, meta = state
    for key, value in tensors.items():
        group, layer = key.split("/", 1)
        sums[groups.index(group)][layer] = value.to(device_of(model))
    distributed.print0(f"resuming the {name} pass at batch {meta['next_batch']} (saved partial sums)")
    return sums, meta["num_sequences"], meta["num_tokens"], meta["next_batch"]


def _save_partial(checkpoint: PassCheckpoint | None, name: str, next_batch: int, groups: dict, num_sequences: int,
                  num_tokens: int) -> None:
    if checkpoint is None or not checkpoint.due(next_batch):
        return
    tensors = {f"{group}/{layer}": value for group, sums in groups.items() for layer, value in sums.items() if value is not None}
    _save(checkpoint, name, tensors, {"next_batch": next_batch, "num_sequences": num_sequences, "num_tokens": num_tokens})


def _load(checkpoint: PassCheckpoint | None, name: str) -> tuple[dict, dict] | None:
    """(tensors, meta) saved under `name`, block-diagonal sums put back together; None if nothing was."""
    state = checkpoint.load(name) if checkpoint is not None else None
    return None if state is None else (unflatten_blocks(state[0]), state[1])


def _save(checkpoint: PassCheckpoint, name: str, tensors: dict, meta: dict) -> None:
    checkpoint.save(name, flatten_blocks(tensors), meta)


def collect_diagonal(model, layers: list[TrackedLayer], batches, objective, config: FactorConfig,
                     show_progress: bool = True) -> tuple[list[LayerFactors], int, int]:
    """Λ = E_sequences[DW_n²]: the diagonal of G (the damping reference of every strategy)."""
    sums = {l.name: None for l in layers}
    num_sequences = num_tokens = 0
    for item in capture_pass(model, layers, batches, objective, desc="diagonal", show_progress=show_progress,
                             **label_draws(config, "diagonal")):
        num_sequences += item.num_sequences
        num_tokens += item.num_tokens
        for layer in layers:
            part_OI = _sum_over_sequences(lambda g, a: sequence_gradients(g, a).square(),
                                          at_least_float32(item.grads[layer.name]),
                                          at_least_float32(item.draw_acts(layer.name)), layer)
            sums[layer.name] = part_OI if sums[layer.name] is None else sums[layer.name] + part_OI
        del item  # not held while the next batch is captured
    tensors = [_zeros_if_none(sums, l.name, (l.out_features, l.in_dim), model) for l in layers]
    num_sequences, num_tokens = _reduce_counts(tensors, num_sequences, num_tokens)
    return [LayerFactors(l.name, l.out_features, l.in_dim, lambda_OI=sums[l.name] / num_sequences) for l in layers], \
        num_sequences, num_tokens


def check_exact_size(layers: list[TrackedLayer], config: FactorConfig) -> None:
    total = sum(l.num_params for l in layers)
    if config.strategy == "exact" and total > config.max_exact_params:
        raise ValueError(f"strategy 'exact' builds a {total} × {total} Gauss-Newton; that exceeds max_exact_params="
                         f"{config.max_exact_params}. Track fewer layers or raise the limit.")


def _fit_exact(model, layers, batches, objective, config: FactorConfig, show_progress: bool):
    check_exact_size(layers, config)
    ggn_PP, num_sequences, num_tokens = exact_ggn(model, layers, batches, objective, show_progress=show_progress)
    fitted, offset = [], 0
    for l in layers:
        block_diagonal = torch.diagonal(ggn_PP)[offset : offset + l.num_params].reshape(l.out_features, l.in_dim)
        fitted.append(LayerFactors(l.name, l.out_features, l.in_dim, lambda_OI=block_diagonal))
        offset += l.num_params
    return fitted, num_sequences, num_tokens, {"ggn_PP": ggn_PP}


def _sum_over_sequences(per_sequence, g_BTO: Tensor, a_BTI: Tensor, layer: TrackedLayer) -> Tensor:
    """Σ_n per_sequence(g_n, a_n) in float64, forming at most ~2^27 O × I entries at once."""
    step = max(1, _SEQUENCE_CHUNK_ELEMENTS // layer.num_params)
    total = None
    for start in range(0, g_BTO.shape[0], step):
        part = per_sequence(g_BTO[start : start + step], a_BTI[start : start + step]).sum(0).double()
        total = part if total is None else total + part
    return total


PASS_STREAMS = {"covariances": 0, "diagonal": 0, "correction": 1}  # each pass's own stream of label draws


def label_draws(config: FactorConfig, name: str) -> dict:
    """capture_pass's label arguments for the pass `name` (docs/design.md §1, pseudo-gradients).

    The eigenvalue correction draws afresh: refitting Λ to the very labels that shaped the
    eigenbasis would fit it to the same noise. Every pass's draws are keyed to (seed, stream, draw,
    sequence index), so they depend neither on batch size, padding nor the number of processes.
    """
    if not config.sample_labels:
        return {"loss": "real"}
    return {"loss": "sampled", "seed": config.seed, "stream": PASS_STREAMS[name], "draws": config.label_samples,
            "expected": config.expected_labels}


def _zeros_if_none(sums: dict, name: str, shape, model, blocks: int = 1,
                   dtype: torch.dtype = torch.float64) -> Tensor | BlockDiagonal:
    if sums[name] is None:  # this process got no batch (fewer batches than processes)
        # on the model's device and in the others' dtype, so that every rank reduces the same buckets
        sums[name] = blocked_covariance(torch.zeros(0, shape[1], dtype=dtype, device=device_of(model)), blocks, dtype)
    return sums[name]


def _reduce_counts(tensors: list[Tensor], num_sequences: int, num_tokens: int,
                   owners: list[int] | None = None) -> tuple[int, int]:
    """Sum the pass's local statistics over processes (one reduce per pass): onto every process, or
    each tensor onto its owner only (`owners[i]` for tensors[i]) and the counts onto all."""
    counts = torch.tensor([num_sequences, num_tokens], dtype=torch.float64, device=tensors[0].device)
    if owners is None:
        distributed.sum_reduce_(tensors + [counts])
    else:
        distributed.reduce_to_owners_(tensors, owners)
        distributed.sum_reduce_([counts])
    num_sequences, num_tokens = int(counts[0]), int(counts[1])
    if num_sequences == 0:
        raise ValueError("train_batches is empty: no sequence to fit the curvature on")
    return num_sequences, num_tokens
