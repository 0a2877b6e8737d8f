"""Process state reduced to plain values. The ONLY module that imports torch.distributed/accelerate.

Every process passes the same full iterable of batches; `shard` hands each process every
world-th batch, with the global index of the batch's first sequence (which keys sampled labels).
Statistics stay local sums until one `sum_reduce_` per pass; scores come back by `gather_by_key`.
Single-process runs take the same code path with world = 1.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist


# Bytes this process sent into collectives (all-reduce payloads, pickled gathers), for benchmarks.
TRAFFIC = {"all_reduce_bytes": 0, "gather_bytes": 0, "calls": 0}


_LOCKSTEP = {"on": False}  # set by shard_model: every process must run the same number of passes


def lockstep() -> bool:
    """Whether a model is sharded over the processes (FSDP), so passes must stay in step."""
    return _LOCKSTEP["on"] and world() > 1


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group when started by `accelerate launch` or `torchrun`."""
    if _launched() and not dist.is_initialized():
        from accelerate import PartialState

        PartialState()
        atexit.register(_leave)


def _leave() -> None:
    """Destroy the process group while the interpreter is still whole.

    Left to interpreter shutdown, gloo's worker threads can release tensors after Python is gone,
    and the process dies of SIGABRT ("terminate called without an active exception"); seen once in
    the 2-process tests, and described in pytorch/pytorch#179291.
    """
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    init()
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    init()
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (e.g. the main process finished writing a file)."""
    if world() > 1:
        dist.barrier()


def device(requested: str = "auto") -> torch.device:
    """The device this process computes on: `requested`, or for "auto" its own GPU when there is one."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Shard the parameters over the processes with FSDP2 (`fully_shard`), one unit per transformer block.

    This is what accelerate's FSDP plugin does with fsdp_version 2 and transformer-based wrapping:
    each process keeps 1/world of every parameter; a block's weights are gathered for its forward
    and backward only. The tracked layers still see full activations and output gradients (the
    data, not the features, is split), so factors and scores equal those of the unsharded model.
    One process: the model is returned unchanged.
    """
    if world() == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    if not blocks:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} to shard "
                         "(the model has no _no_split_modules); run without model.fsdp")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    _LOCKSTEP["on"] = True
    return model


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs)


def shard(batches: Iterable, size_of: Callable[[Any], int]) -> Iterator[tuple[int, int, Any]]:
    """Yield (batch index, first sequence index, batch) for this process's share of the batches."""
    this_rank, size = rank(), world()
    first = 0
    for index, batch in enumerate(batches):
        if index % size == this_rank:
            yield index, first, batch
        first += size_of(batch)


_BUCKET_BYTES = 2**28  # the extra memory of a reduce: one flattened bucket of at most 256 MiB


def sum_reduce_(tensors: list[torch.Tensor]) -> None:
    """In-place sum over processes: flattened all-reduces of up to 256 MiB, per dtype and device."""
    if world() == 1 or not tensors:
        return
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}  # (dtype, device) -> buckets
    filled: dict[tuple, int] = {}  # bytes in the last bucket of each kind
    for tensor in tensors:
        kind, size = (tensor.dtype, tensor.device), tensor.numel() * tensor.element_size()
        if kind not in buckets or filled[kind] + size > _BUCKET_BYTES:
            buckets.setdefault(kind, []).append([])
            filled[kind] = 0
        buckets[kind][-1].append(tensor)
        filled[kind] += size
    for bucket in (bucket for kind in buckets.values() for bucket in kind):
        alone = bucket[0]
        if len(bucket) == 1 and alone.is_contiguous() and not (alone.device.type == "cpu" and dist.get_backend() == "nccl"):
            dist.all_reduce(alone)  # a tensor larger than a bucket: reduced in place, no copy
            TRAFFIC["all_reduce_bytes"] += alone.numel() * alone.element_size()
            TRAFFIC["calls"] += 1
            continue
        flat = torch.cat([t.reshape(-1) for t in bucket])
        if flat.device.type == "cpu" and dist.get_backend() == "nccl":  # pragma: no cover - GPU clusters
            flat = flat.cuda()
        dist.all_reduce(flat)
        TRAFFIC["all_reduce_bytes"] += flat.numel() * flat.element_size()
        TRAFFIC["calls"] += 1
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t).to(t.device))
            offset += t.numel()


def reduce_to_owners_(tensors: list[torch.Tensor], owners: list[int]) -> None:
    """Sum `tensors[i]` over processes onto process `owners[i]` only (others' copies are left undefined).

    Flattened reduces of up to 256 MiB per (owner, dtype, device): the traffic of an all-reduce's
    reduce-scatter half, and no process ever receives a sum it does not own.
    """
    if world() == 1 or not tensors:
        return
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    filled: dict[tuple, int] = {}
    for tensor, owner in zip(tensors, owners):
        kind, size = (owner, tensor.dtype, tensor.device), tensor.numel() * tensor.element_size()
        if kind not in buckets or filled[kind] + size > _BUCKET_BYTES:
            buckets.setdefault(kind, []).append([])
            filled[kind] = 0
        buckets[kind][-1].append(tensor)
        filled[kind] += size
    for (owner, _, _), bucket in sorted(((kind, b) for kind, kinds in buckets.items() for b in kinds),
                                        key=lambda item: (item[0][0], str(item[0][1]), str(item[0][2]))):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        if flat.device.type == "cpu" and dist.get_backend() == "nccl":  # pragma: no cover - GPU clusters
            flat = flat.cuda()
        dist.reduce(flat, dst=owner)
        TRAFFIC["reduce_bytes"] = TRAFFIC.get("reduce_bytes", 0) + flat.numel() * flat.element_size()
        TRAFFIC["calls"] += 1
        if rank() == owner:
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t).to(t.device))
                offset += t.numel()
        del flat


def broadcast_tensors_(tensors: list[torch.Tensor], src: int) -> None:
    """Overwrite `tensors` on every process with process `src`'s (one flattened broadcast)."""
    if world() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
    if flat.device.type == "cpu" and dist.get_backend() == "nccl":  # pragma: no cover - GPU clusters
        flat = flat.cuda()
    dist.broadcast(flat, src=src)
    TRAFFIC["broadcast_bytes"] = TRAFFIC.get("broadcast_bytes", 0) + flat.numel() * flat.element_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t).to(t.device, t.dtype))
        offset += t.numel()


def sum_scalar(value: float) -> float:
    if world() == 1:
        return value
    out = [None] * world()
    dist.all_gather_object(out, value)
    return float(sum(out))


def gather_tensors_by_key(local: dict[Any, tuple[Any, list[torch.Tensor]]], device: torch.device
                          ) -> dict[Any, tuple[Any, list[torch.Tensor]]]:
    """Merge {key: (small object, [tensors])} from every process onto `device` of every process.

    The tensors are never pickled: only the small objects, shapes and dtypes travel as objects
    (not counted in TRAFFIC); each key's tensors are then broadcast from the process that holds them
    (one flattened broadcast per key) into buffers allocated where they are needed.
    """
    if world() == 1:
        return {key: (meta, [t.to(device) for t in tensors]) for key, (meta, tensors) in local.items()}
    specs: dict = {}  # key -> (owner, meta, [(shape, dtype)])
    for part in _all_gather_objects({key: (rank(), meta, [(tuple(t.shape), str(t.dtype).removeprefix("torch."))
                                                          for t in tensors])
                                     for key, (meta, tensors) in local.items()}):
        specs.update(part)
    merged = {}
    for key in sorted(specs):
        owner, meta, shapes = specs[key]
        if owner == rank():
            tensors = [t.to(device) for t in local[key][1]]
        else:
            tensors = [torch.empty(shape, dtype=getattr(torch, dtype), device=device) for shape, dtype in shapes]
        broadcast_tensors_(tensors, src=owner)
        merged[key] = (meta, tensors)
    return merged


def gather_by_key(local: dict) -> dict:
    """Merge {key: value} dicts from every process; the result is complete on every process."""
    if world() == 1:
        return local
    payload = {key: _to_cpu(value) for key, value in local.items()}
    TRAFFIC["gather_bytes"] += _payload_bytes(payload)
    TRAFFIC["calls"] += 1
    merged: dict = {}
    for part in _all_gather_objects(payload):
        merged.update(part)
    return merged


def _all_gather_objects(value: Any) -> list:
    parts = [None] * world()
    dist.all_gather_object(parts, value)
    return parts


def broadcast_object(value: Any) -> Any:
    """The main process's `value` on every process: for a decision all must take alike (the same collectives follow)."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _to_cpu(getattr(value, f.name)) for f in dataclasses.fields(value)})
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _payload_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(_payload_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (tuple, list)):
        return sum(_payload_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_payload_bytes(v) for v in value.values())
    return 8
