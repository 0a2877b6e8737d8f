"""One frozen dataclass per stage; `__post_init__` names the bad field.

Each field's docstring (the string literal under it) is the help text for the CLI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac", "lissa", "exact")
DTYPES = ("float32", "float64")
CORRECTION_ORDERS = ("auto", "tokens", "sequences")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


@dataclass(frozen=True)
class FactorConfig:
    """How the curvature (G + λI) is approximated and fitted."""

    strategy: str = "ekfac"
    """Curvature approximation: identity, diagonal, kfac, ekfac (default), lissa, exact."""

    layers: tuple[str, ...] | None = None
    """Regular expressions matched (re.search) against module names; None = the MLP linears of
    every transformer block, or every Linear/Conv1D when the model has no such blocks."""

    damping_factor: float = 0.1
    """Per-layer damping λ_ℓ = damping_factor × mean(Λ_ℓ), used when `damping` is not set."""

    damping: float | None = None
    """A fixed damping λ for every layer instead of the relative one."""

    sample_labels: bool = True
    """Sample labels from the model (true Fisher = Gauss-Newton); False = empirical Fisher."""

    seed: int = 0
    """Seed of the sampled labels; draws are keyed to (seed, sequence index)."""

    factor_dtype: str = "float32"
    """dtype of the stored eigenvectors and eigenvalues (accumulation is always float64)."""

    correction_order: str = "auto"
    """EK-FAC contraction order: rotate tokens first, rotate per-sequence gradients, or auto (cheaper)."""

    max_exact_params: int = 20_000
    """The exact strategy refuses models with more tracked parameters than this (G is P × P)."""

    lissa_max_iterations: int = 2_000
    """LiSSA: iteration cap (one training batch per iteration)."""

    lissa_tolerance: float = 1e-4
    """LiSSA: stop when ‖I_k − I_{k−1}‖ ≤ tolerance × ‖I_k‖."""

    lissa_scale: float | None = None
    """LiSSA: scale above the largest eigenvalue of G + λI; None = estimated by power iteration."""

    def __post_init__(self) -> None:
        _require(self.strategy in STRATEGIES, "strategy", f"{self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        _require(self.damping_factor > 0, "damping_factor", f"must be > 0, got {self.damping_factor}")
        _require(self.damping is None or self.damping > 0, "damping", f"must be > 0, got {self.damping}")
        _require(self.factor_dtype in DTYPES, "factor_dtype", f"{self.factor_dtype!r} is not one of {DTYPES}")
        _require(self.correction_order in CORRECTION_ORDERS, "correction_order",
                 f"{self.correction_order!r} is not one of {CORRECTION_ORDERS}")
        _require(self.max_exact_params > 0, "max_exact_params", "must be > 0")
        _require(self.lissa_max_iterations > 0, "lissa_max_iterations", "must be > 0")
        _require(self.lissa_tolerance > 0, "lissa_tolerance", "must be > 0")
        _require(self.lissa_scale is None or self.lissa_scale > 0, "lissa_scale", "must be > 0")
        if self.layers is not None:
            _require(isinstance(self.layers, (tuple, list)) and len(self.layers) > 0, "layers",
                     "must be a non-empty list of name patterns or None")
            object.__setattr__(self, "layers", tuple(self.layers))


@dataclass(frozen=True)
class ScoreConfig:
    """How query gradients are preconditioned and scored against training sequences."""

    rank: int | None = None
    """Store each preconditioned query gradient as a rank-k SVD (k = 32 in the paper); None = full rank."""

    per_layer: bool = True
    """Also return the score split by tracked layer."""

    per_token: bool = False
    """Also return the score split by training token (position t: input token t, predicting t+1)."""

    compute_dtype: str = "float32"
    """dtype of the preconditioning and score kernels."""

    def __post_init__(self) -> None:
        _require(self.rank is None or self.rank > 0, "rank", f"must be a positive integer or None, got {self.rank}")
        _require(self.compute_dtype in DTYPES, "compute_dtype", f"{self.compute_dtype!r} is not one of {DTYPES}")


CANDIDATES = ("all", "shortlist")


@dataclass(frozen=True)
class QueryConfig:
    """How prompt/completion queries are answered over a packed training corpus."""

    rank: int | None = 32
    """Rank-k compression of each preconditioned query gradient in the shared scan (None = full rank)."""

    rerank: int = 50
    """Rescore each query's `rerank` most positive and most negative candidates with full-rank query
    gradients (the second stage); 0 = keep the scan's scores."""

    top_k: int = 10
    """Most positive and most negative sequences returned per query, with per-layer and per-token detail."""

    candidates: str = "all"
    """Training sequences scored: all, or a per-query BM25 shortlist (needs an index)."""

    shortlist_k: int = 10_000
    """Candidates per query taken from the shortlist."""

    batch_size: int = 8
    """Training sequences per forward/backward in the scan."""

    query_batch_size: int = 16
    """Query rows per gradient batch."""

    num_workers: int = 0
    """DataLoader worker processes reading training sequences."""

    max_new_tokens: int = 32
    """Length bound of a greedy completion generated for a query that gives none."""

    spurious_threshold: float = 2 / 3
    """A sequence is flagged spurious when its token influences a satisfy ‖a‖₂/‖a‖₁ > this (extremely sparse)."""

    compute_dtype: str = "float32"
    """dtype of the preconditioning and score kernels."""

    def __post_init__(self) -> None:
        _require(self.rank is None or self.rank > 0, "rank", f"must be a positive integer or None, got {self.rank}")
        _require(self.rerank >= 0, "rerank", f"must be >= 0, got {self.rerank}")
        _require(self.top_k > 0, "top_k", f"must be > 0, got {self.top_k}")
        _require(self.candidates in CANDIDATES, "candidates", f"{self.candidates!r} is not one of {', '.join(CANDIDATES)}")
        _require(self.shortlist_k > 0, "shortlist_k", f"must be > 0, got {self.shortlist_k}")
        _require(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        _require(self.query_batch_size > 0, "query_batch_size", f"must be > 0, got {self.query_batch_size}")
        _require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _require(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        _require(0 < self.spurious_threshold <= 1, "spurious_threshold", f"must be in (0, 1], got {self.spurious_threshold}")
        _require(self.compute_dtype in DTYPES, "compute_dtype", f"{self.compute_dtype!r} is not one of {DTYPES}")


def to_dict(config) -> dict:
    """Plain-JSON form of a stage config (saved beside every output)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def from_dict(cls, values: dict):
    """Build `cls` from a dict, naming any unknown key."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    values = dict(values)
    if isinstance(values.get("layers"), list):
        values["layers"] = tuple(values["layers"])
    return cls(**values)
