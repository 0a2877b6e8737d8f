"""The linear datamodeling score: do summed influences predict what retraining on a subset does?

Park et al. (2023, TRAK). M subsets S_m of the N training sequences, each holding round(αN) of them
and drawn from (seed, m) alone (so the first M subsets stay the same when M grows), are retrained
by the caller's `train_fn(indices, seed)`; f_q is measured on each retrained model (the objective's
`measurement`: log p(completion | prompt), or log p(y | x)). For every variant of the influence
computation, on the model trained on all N sequences,

    LDS_q = ρ_spearman over m of ( Σ_{n ∈ S_m} score(q, n),  f_q(S_m) ),   LDS = mean_q LDS_q ± SE over queries.

Retraining is the cost, so each retrained subset's f is written to `cache_dir` (one JSON file per
subset and retraining seed, atomically, as soon as it is measured): adding a variant retrains
nothing, and an interrupted run resumes with the subsets it has not finished. A cached f is used
only for the same subset (the sha256 of its indices), the same retraining seed, the same queries
and the same `cache_key` (say what the training function is; change it when the training changes).

Shapes: Q queries, N training sequences, M subsets, R retraining seeds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import ConfigError, EvaluateConfig
from .metrics import MeanSE, lds_per_query, mean_and_se, spearman
from .objectives import Objective, batch_size, to_device
from .passes import device_of
from .storage import atomic_write_text
from .variants import Variant, score_variants, variants_from_config

TrainFn = Callable[[np.ndarray, int], nn.Module]  # (indices of the sequences kept, retraining seed) -> trained model


def draw_subsets(num_train: int, num_subsets: int, fraction: float, seed: int) -> np.ndarray:
    """[M, N] bool: subset m holds round(α N) sequences drawn without replacement by numpy's Generator([seed, m])."""
    size = int(round(fraction * num_train))
    if not 1 <= size < num_train:
        raise ConfigError(f"fraction: {fraction} of {num_train} training sequences is {size}; each subset must keep "
                          f"at least one sequence and leave at least one out")
    subsets_MN = np.zeros((num_subsets, num_train), dtype=bool)
    for m in range(num_subsets):
        subsets_MN[m, np.random.default_rng([seed, m]).choice(num_train, size=size, replace=False)] = True
    return subsets_MN


def batch_rows(batch) -> list:
    """The batch cut into batches of one row each (tensors, dicts and tuples of tensors)."""
    count = batch_size(batch)

    def row(value, i):
        if isinstance(value, Tensor):
            return value[i : i + 1]
        if isinstance(value, Mapping):
            return {key: row(inner, i) for key, inner in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(row(inner, i) for inner in value)
        return value

    return [row(batch, i) for i in range(count)]


@torch.no_grad()
def measure_queries(model: nn.Module, query_batches: Iterable, objective: Objective) -> np.ndarray:
    """f_q for every query (row) of the batches, [Q] float64: the objective's measurement one row at a time."""
    was_training = model.training
    model.eval()
    device = device_of(model)
    values = [float(objective.measurement(model, to_device(one, device))) for batch in query_batches
              for one in batch_rows(batch)]
    model.train(was_training)
    return np.asarray(values, dtype=np.float64)


def digest_batches(batches: Iterable) -> str:
    """sha256 of every tensor of the batches (dtype, shape and values): which queries f was measured on."""
    digest = hashlib.sha256()

    def add(value):
        if isinstance(value, Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, Mapping):
            for key in sorted(value):
                digest.update(str(key).encode())
                add(value[key])
        elif isinstance(value, (tuple, list)):
            for inner in value:
                add(inner)

    for batch in batches:
        add(batch)
    return digest.hexdigest()[:16]


def subset_digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(indices, dtype=np.int64)).tobytes()).hexdigest()[:16]


class RetrainCache:
    """f of each retrained subset, one JSON file per (subset, retraining seed) in `directory`; None = memory only."""

    def __init__(self, directory, key: dict):
        self.directory = None if directory is None else Path(directory)
        self.key = json.loads(json.dumps(key, sort_keys=True))

    def _path(self, digest: str, seed: int) -> Path:
        return self.directory / f"subset-{digest}.seed{seed}.json"

    def load(self, digest: str, seed: int, num_queries: int) -> np.ndarray | None:
        if self.directory is None or not self._path(digest, seed).exists():
            return None
        try:
            record = json.loads(self._path(digest, seed).read_text())
        except json.JSONDecodeError:
            return None  # never a half-written file (writes are atomic), but a damaged one is measured again
        if record.get("key") != self.key or len(record.get("f", [])) != num_queries:
            return None
        return np.asarray(record["f"], dtype=np.float64)

    def save(self, digest: str, seed: int, subset: int, f_Q: np.ndarray, size: int) -> None:
        if self.directory is not None:
            record = {"key": self.key, "subset": subset, "indices_sha256": digest, "size": size, "retrain_seed": seed,
                      "f": [float(v) for v in f_Q]}
            atomic_write_text(self._path(digest, seed), json.dumps(record))


def retrained_measurements(train_fn: TrainFn, query_batches: Iterable, objective: Objective, subsets_MN: np.ndarray,
                           *, retrain_seeds: int = 1, cache: RetrainCache | None = None,
                           show_progress: bool = True) -> tuple[np.ndarray, int]:
    """(f_MRQ, models trained now): f on a model retrained on each subset with each seed, cached ones reused."""
    cache = cache or RetrainCache(None, {})
    num_queries = sum(batch_size(batch) for batch in query_batches)
    f_MRQ = np.full((len(subsets_MN), retrain_seeds, num_queries), np.nan)
    todo = []
    for m, subset_N in enumerate(subsets_MN):
        digest = subset_digest(np.flatnonzero(subset_N))
        for r in range(retrain_seeds):
            cached = cache.load(digest, r, num_queries)
            if cached is None:
                todo.append((m, r, digest))
            else:
                f_MRQ[m, r] = cached
    bar = tqdm(total=f_MRQ.shape[0] * retrain_seeds, initial=f_MRQ.shape[0] * retrain_seeds - len(todo),
               desc="retrained subsets", disable=not show_progress)
    for m, r, digest in todo:
        indices = np.flatnonzero(subsets_MN[m])
        model = train_fn(indices, r)
        f_MRQ[m, r] = measure_queries(model, query_batches, objective)
        del model
        if not np.isfinite(f_MRQ[m, r]).all():
            raise ValueError(f"subset {m} (seed {r}): the retrained model's measurement is not finite; check the "
                             f"training function (learning rate, divergence)")
        cache.save(digest, r, m, f_MRQ[m, r], len(indices))
        bar.update(1)
    bar.close()
    return f_MRQ, len(todo)


@dataclass
class LDSResult:
    """LDS per variant: per-query values [Q], their mean ± SE; the measurements they were computed from."""

    per_query: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]  # score(q, n) of each variant, [Q, N], on the model trained on every sequence
    skipped: dict[str, str]
    f_MRQ: np.ndarray  # f of every retrained model
    subsets_MN: np.ndarray
    retrained: int  # models trained by this call (0 = everything came from the cache)
    fraction: float
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict[str, MeanSE]:
        return {name: mean_and_se(values) for name, values in self.per_query.items()}

    def seed_agreement(self) -> MeanSE | None:
        """mean_q ρ_spearman(f_q under seed 0, f_q under seed 1) across subsets: how repeatable retraining is."""
        if self.f_MRQ.shape[1] < 2:
            return None
        return mean_and_se(_safe_spearman(self.f_MRQ[:, 0, q], self.f_MRQ[:, 1, q]) for q in range(self.f_MRQ.shape[2]))

    def to_dict(self) -> dict:
        agreement = self.seed_agreement()
        return {"num_subsets": int(self.subsets_MN.shape[0]), "num_train": int(self.subsets_MN.shape[1]),
                "fraction": self.fraction, "retrain_seeds": int(self.f_MRQ.shape[1]),
                "num_queries": int(self.f_MRQ.shape[2]), "retrained_now": self.retrained,
                "seed_agreement": None if agreement is None else agreement._asdict(), **self.settings,
                "variants": {name: {**summary._asdict(), "per_query": [None if not np.isfinite(v) else float(v)
                                                                          for v in self.per_query[name]]}
                             for name, summary in self.summary().items()},
                "skipped": dict(self.skipped)}


def _safe_spearman(x: np.ndarray, y: np.ndarray) -> float:
    return spearman(x, y) if x.size >= 2 else float("nan")


def linear_datamodeling_score(model: nn.Module, train_batches: Iterable, query_batches: Iterable, objective: Objective,
                              train_fn: TrainFn, variants: Sequence[Variant] | None = None,
                              config: EvaluateConfig = EvaluateConfig(), *, cache_dir=None, cache_key: str = "",
                              show_progress: bool = True) -> LDSResult:
    """LDS of each variant, against `config.num_subsets` models retrained by `train_fn` (cached in `cache_dir`).

    model: trained on all N training sequences (the batches' rows, in order); train_fn(indices, seed)
    must train the same way on the rows `indices` only (same initialisation and data order for
    seed 0, ideally: then the retrained models differ by their data alone) and return the model.
    variants: None = `config.variants`. The scores are computed first, so a variant that fails does
    so before any retraining.
    """
    variants = list(variants) if variants is not None else variants_from_config(config.variants)
    num_train = sum(batch_size(batch) for batch in train_batches)
    subsets_MN = draw_subsets(num_train, config.num_subsets, config.fraction, config.seed)
    scores, skipped = score_variants(model, train_batches, query_batches, objective, variants, show_progress=show_progress)
    key = {"num_train": num_train, "queries": digest_batches(query_batches), "cache_key": cache_key}
    f_MRQ, retrained = retrained_measurements(train_fn, query_batches, objective, subsets_MN,
                                              retrain_seeds=config.retrain_seeds, cache=RetrainCache(cache_dir, key),
                                              show_progress=show_progress)
    f_MQ = f_MRQ.mean(axis=1)
    scores = {name: scores_QN.numpy() for name, scores_QN in scores.items()}
    per_query = {name: lds_per_query(scores_QN, subsets_MN, f_MQ) for name, scores_QN in scores.items()}
    return LDSResult(per_query, scores, skipped, f_MRQ, subsets_MN, retrained, config.fraction)
