"""The engine's settings: one frozen dataclass per computation; `__post_init__` names the bad field.

FactorConfig (fit_factors), ScoreConfig (compute_scores), QueryConfig (query_influence),
SelfInfluenceConfig (self_influence), EvaluateConfig (the evaluation harness), and the dataclass ↔
dict conversion every manifest uses. The run directory's other sections and the YAML file are
`run_config`'s. Each field's docstring (the string literal under it) is the help text for the CLI.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac", "lissa", "exact")
DTYPES = ("float32", "float64")
ROTATION_ORDERS = ("tokens", "sequences", "inputs first", "outputs first")  # factors.rotation_costs
CORRECTION_ORDERS = ("auto", *ROTATION_ORDERS)
SHARDINGS = ("none", "auto")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check_scoring_fields(config) -> None:
    """The refinement and delta_logp fields that ScoreConfig and QueryConfig share (each declares them
    itself, so that its docstrings are its CLI help)."""
    _require(isinstance(config.refine_steps, int) and config.refine_steps >= 0, "refine_steps",
             f"must be an integer >= 0, got {config.refine_steps!r}")
    _require(config.refine_batches is None or config.refine_batches > 0, "refine_batches", "must be > 0 or null")
    _require(config.refine_tolerance >= 0, "refine_tolerance", f"must be >= 0, got {config.refine_tolerance}")
    _require(config.train_size is None or config.train_size > 0, "train_size",
             f"must be > 0 or null, got {config.train_size}")


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


@dataclass(frozen=True)
class FactorConfig:
    """How the curvature (G + λI) is approximated and fitted."""

    strategy: str = "ekfac"
    """Curvature approximation: identity, diagonal, kfac, ekfac (default), lissa, exact."""

    layers: tuple[str, ...] | None = None
    """Regular expressions matched (re.search) against layer names (an expert's projection:
    `...mlp.experts.<e>.down_proj`); None = the MLP linears and experts of every transformer block
    (a transformer whose MLP is not recognised is refused), or every Linear/Conv1D when the model
    has no such blocks. Never the embeddings or output head by default; a tied weight is refused."""

    damping_factor: float = 0.1
    """Per-layer damping λ_ℓ = damping_factor × mean(Λ_ℓ), used when `damping` is not set."""

    damping: float | None = None
    """A fixed damping λ for every layer instead of the relative one."""

    sample_labels: bool = True
    """Sample labels from the model (true Fisher = Gauss-Newton); False = empirical Fisher."""

    seed: int = 0
    """Seed of the sampled labels; draws are keyed to (seed, pass, draw, sequence index)."""

    label_samples: int = 1
    """Sampled labels per position in the covariance and correction passes: a less noisy Fisher at
    label_samples× the backward cost (one forward)."""

    expected_labels: bool = False
    """The exact expectation over every class instead of sampled labels (a backward per class): for
    classifiers with few classes (one prediction per example)."""

    factor_dtype: str = "float32"
    """dtype of the stored eigenvectors and eigenvalues (accumulation: `accumulate_dtype`)."""

    accumulate_dtype: str = "float64"
    """dtype of the covariance pass's running sums of A and S (and of their reduce): float64, or
    float32 for half the memory of the pass (per-batch products are float32 either way)."""

    shard: str = "none"
    """kfac/ekfac with several processes: "auto" gives each layer's factors to one process (greedy
    by bytes), reduces its sums to that process only, decomposes it there and saves one shard per
    process (docs/scaling.md); "none" keeps every layer's factors on every process."""

    correction_order: str = "auto"
    """EK-FAC correction's rotation order (factors.rotation_costs): rotate the tokens, rotate the per-sequence
    gradients, rotate the inputs first or the output gradients first; auto: the cheapest for the shape."""

    blocks: int = 1
    """Split A and S into this many diagonal blocks (the paper's 52B setting: 2); 1 = full factors."""

    block_min_dim: int = 0
    """Only factors at least this wide are split into blocks."""

    memory_budget_gb: float | None = None
    """Fit kfac/ekfac factors in groups of layers whose factors fit in this many GiB (each group
    costs its own passes over the data); None = all layers at once."""

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
        for name in ("damping_factor", "damping"):  # an infinite λ divides every score to zero
            value = getattr(self, name)
            _require(value is None or math.isfinite(value), name, f"must be a finite number, got {value}")
        _require(self.factor_dtype in DTYPES, "factor_dtype", f"{self.factor_dtype!r} is not one of {DTYPES}")
        _require(self.accumulate_dtype in DTYPES, "accumulate_dtype", f"{self.accumulate_dtype!r} is not one of {DTYPES}")
        _require(self.shard in SHARDINGS, "shard", f"{self.shard!r} is not one of {SHARDINGS}")
        _require(self.correction_order in CORRECTION_ORDERS, "correction_order",
                 f"{self.correction_order!r} is not one of {CORRECTION_ORDERS}")
        _require(self.max_exact_params > 0, "max_exact_params", "must be > 0")
        _require(isinstance(self.label_samples, int) and self.label_samples >= 1, "label_samples",
                 f"must be a positive integer, got {self.label_samples!r}")
        _require(not (self.expected_labels and not self.sample_labels), "expected_labels",
                 "needs sample_labels: true (the empirical Fisher uses the real labels)")
        _require(self.blocks >= 1, "blocks", f"must be >= 1, got {self.blocks}")
        _require(self.memory_budget_gb is None or self.memory_budget_gb > 0, "memory_budget_gb", "must be > 0 or null")
        _require(self.block_min_dim >= 0, "block_min_dim", f"must be >= 0, got {self.block_min_dim}")
        _require(self.lissa_max_iterations > 0, "lissa_max_iterations", "must be > 0")
        _require(self.lissa_tolerance > 0, "lissa_tolerance", "must be > 0")
        _require(self.lissa_scale is None or self.lissa_scale > 0, "lissa_scale", "must be > 0")
        if self.layers is not None:
            _require(isinstance(self.layers, (tuple, list)) and len(self.layers) > 0, "layers",
                     "must be a non-empty list of name patterns or None")
            object.__setattr__(self, "layers", tuple(self.layers))
            import re

            for pattern in self.layers:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as error:
                    raise ConfigError(f"layers: {pattern!r} is not a regular expression ({error})") from None


@dataclass(frozen=True)
class ScoreConfig:
    """How query gradients are preconditioned and scored against training sequences."""

    rank: int | None = None
    """Store each preconditioned query gradient as a rank-k SVD (k = 32 in the paper); None = full rank."""

    per_layer: bool = True
    """Also return the score split by tracked layer."""

    per_token: bool = False
    """Also return the score split by training position (position t: the influence through the tracked
    layers at input token t, which predicts token t+1 and, through attention, later ones)."""

    compute_dtype: str = "float32"
    """dtype of the preconditioning and score kernels."""

    refine_steps: int = 0
    """Conjugate-gradient steps refining EK-FAC's (G + λ)⁻¹∇f toward the exact damped Gauss-Newton
    solve, each a pass of Gauss-Newton-vector products over the refinement batches (0 = none)."""

    refine_batches: int | None = None
    """Training batches of every refinement step, spread evenly over the data (None = all)."""

    refine_tolerance: float = 1e-4
    """Stop refining a query when its residual ‖v − (G + λ)x‖ ≤ this × ‖v‖."""

    train_size: int | None = None
    """N in delta_logp = score / N: the number of sequences the model was trained on. None = the
    training sequences scored (set it when they are a sample of the training set; factors fitted on a
    sample or another packing do not change N)."""

    def __post_init__(self) -> None:
        _require(self.rank is None or self.rank > 0, "rank", f"must be a positive integer or None, got {self.rank}")
        _require(self.compute_dtype in DTYPES, "compute_dtype", f"{self.compute_dtype!r} is not one of {DTYPES}")
        _check_scoring_fields(self)


CANDIDATES = ("all", "shortlist")
NORMALIZATIONS = ("none", "relatif", "cosine")


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

    shortlist_query_counts: bool = True
    """BM25 sums over the query's tokens with their repeats (the paper: a keyword matters more the
    more often the query holds it); false = each distinct query token once."""

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

    refine_steps: int = 0
    """Conjugate-gradient steps refining EK-FAC's (G + λ)⁻¹∇f toward the exact damped Gauss-Newton
    solve, each a pass of Gauss-Newton-vector products over the refinement batches (0 = none)."""

    refine_batches: int | None = None
    """Training batches of every refinement step, spread evenly over the data (None = all)."""

    refine_tolerance: float = 1e-4
    """Stop refining a query when its residual ‖v − (G + λ)x‖ ≤ this × ‖v‖."""

    train_size: int | None = None
    """N in delta_logp = score / N: the number of sequences the model was trained on. None = the
    sequences of the corpus scored (set it when that corpus is a sample of the training set; factors
    fitted on a sample or another packing do not change N)."""

    checkpoint_seconds: float = 300.0
    """Save the scan's progress this often, so that a killed query resumes (0 = after every batch)."""

    checkpoint_batches: int | None = None
    """Save every this many batches instead of by time (None = by time)."""

    normalize: str = "none"
    """Rank by the raw score (none), by RelatIF score / √s(n) (relatif), or by the cosine
    score / (‖P^{1/2}∇f_q‖ ‖P^{1/2}∇log p(z_n)‖) (cosine); s(n) = the sequence's self-influence.
    The raw score is kept beside the normalised one. The normalised ranking orders the pool the scan
    hands to the rescoring, each query's max(rerank, top_k) best and worst candidates, whose s(n) one
    self-influence pass computes. With a self-influence audit of the same factors and corpus in the run
    (the CLI finds it), the scan keeps the best by score / √s(n), so no sequence that normalises high is
    left out; without one it keeps the best raw scores, and `rerank` widens that pool."""

    def __post_init__(self) -> None:
        _require(self.normalize in NORMALIZATIONS, "normalize",
                 f"{self.normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        _require(self.rank is None or self.rank > 0, "rank", f"must be a positive integer or None, got {self.rank}")
        _require(self.rerank >= 0, "rerank", f"must be >= 0, got {self.rerank}")
        _require(self.checkpoint_seconds >= 0, "checkpoint_seconds", f"must be >= 0, got {self.checkpoint_seconds}")
        _require(self.checkpoint_batches is None or self.checkpoint_batches > 0, "checkpoint_batches", "must be > 0 or null")
        _require(self.top_k > 0, "top_k", f"must be > 0, got {self.top_k}")
        _require(self.candidates in CANDIDATES, "candidates", f"{self.candidates!r} is not one of {', '.join(CANDIDATES)}")
        _require(self.shortlist_k > 0, "shortlist_k", f"must be > 0, got {self.shortlist_k}")
        _require(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        _require(self.query_batch_size > 0, "query_batch_size", f"must be > 0, got {self.query_batch_size}")
        _require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _require(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        _require(0 < self.spurious_threshold <= 1, "spurious_threshold", f"must be in (0, 1], got {self.spurious_threshold}")
        _require(self.compute_dtype in DTYPES, "compute_dtype", f"{self.compute_dtype!r} is not one of {DTYPES}")
        _check_scoring_fields(self)


@dataclass(frozen=True)
class SelfInfluenceConfig:
    """Self-influence s(n) = ∇log p(z_n)ᵀ (G + λI)⁻¹ ∇log p(z_n) of every training sequence (a corpus audit)."""

    batch_size: int = 8
    """Training sequences per forward/backward."""

    num_workers: int = 0
    """DataLoader worker processes."""

    per_token: bool = False
    """Also return s(n) split by position (Python API; the stage shades the top sequences' tokens)."""

    compute_dtype: str = "float32"
    """dtype of the whitening and squaring kernels."""

    top: int = 20
    """Highest and lowest sequences written to top.jsonl and the page."""

    duplicate_sketch: int = 32
    """Near-duplicates are searched over the whole corpus through a k × k sketch of each sequence's whitened
    gradient (k = this; a sketched cosine c is off by (1 - c²)/k to (1 - c²)·√(2/k); 0 = no search)."""

    duplicate_threshold: float = 0.9
    """Two sequences are near-duplicates when the cosine of their P^{1/2}-whitened gradients is at least this."""

    checkpoint_seconds: float = 300.0
    """Save the pass's progress this often, so that a killed run resumes (0 = after every batch)."""

    checkpoint_batches: int | None = None
    """Save every this many batches instead of by time (None = by time)."""

    tolerance: float = 0.0
    """kfac/ekfac: 0 = exact; ε in (0, 1) rotates only onto the directions where Λ / (Λ + λ) > ε and counts the
    rest as if Λ = 0, which over-estimates s(n) by at most ε / (1 - ε) of itself (a bound per sequence is kept).
    Much faster on a trained model, whose spectrum falls fast; no faster where it is flat."""

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, "self_influence.batch_size", f"must be > 0, got {self.batch_size}")
        _require(0 <= self.tolerance < 1, "self_influence.tolerance", f"must be in [0, 1), got {self.tolerance}")
        _require(self.num_workers >= 0, "self_influence.num_workers", f"must be >= 0, got {self.num_workers}")
        _require(self.compute_dtype in DTYPES, "self_influence.compute_dtype",
                 f"{self.compute_dtype!r} is not one of {DTYPES}")
        _require(self.top > 0, "self_influence.top", f"must be > 0, got {self.top}")
        _require(self.duplicate_sketch >= 0, "self_influence.duplicate_sketch",
                 f"must be >= 0, got {self.duplicate_sketch}")
        _require(-1 <= self.duplicate_threshold <= 1, "self_influence.duplicate_threshold",
                 f"must be a cosine in [-1, 1], got {self.duplicate_threshold}")
        _require(self.checkpoint_seconds >= 0, "self_influence.checkpoint_seconds",
                 f"must be >= 0, got {self.checkpoint_seconds}")
        _require(self.checkpoint_batches is None or self.checkpoint_batches > 0, "self_influence.checkpoint_batches",
                 "must be > 0 or null")


MEASUREMENTS = ("lds", "planted")
INITS = ("scratch", "model")


@dataclass(frozen=True)
class EvaluateConfig:
    """How far to trust the scores on this setup: LDS against retrained models, planted-fact recall, per variant."""

    measurements: tuple[str, ...] = ("lds", "planted")
    """Which measurements to run: lds (linear datamodeling score), planted (planted-fact recall), or both."""

    variants: tuple = ("identity", "diagonal", "kfac", "ekfac")
    """Influence variants scored against the same retrained models: strategy names, or mappings {name, strategy,
    <any FactorConfig or ScoreConfig field>: value} such as {name: ekfac-d1e-3, strategy: ekfac, damping: 0.001};
    the factors section is their base."""

    num_subsets: int = 32
    """LDS: random subsets S_m of the training sequences, each retrained (subset m is drawn from (seed, m))."""

    fraction: float = 0.5
    """LDS: share α of the training sequences each subset keeps."""

    seed: int = 0
    """Seed of the subset draws, the held-out queries and the invented facts."""

    retrain_seeds: int = 1
    """LDS: models trained per subset, with seeds 0 .. retrain_seeds-1, their f averaged; with 1, every subset is
    trained with the reference model's seed: the same initialisation and data order minus the removed sequences."""

    heldout_queries: int = 16
    """LDS (CLI): packed sequences held out of training and used as queries (prompt = the first half of their
    tokens, completion = the rest), besides queries.file; 0 = the queries of queries.file only."""

    init: str = "scratch"
    """LDS (CLI): every model, the reference included, starts from weights drawn anew for the model's architecture
    (scratch) or from the model's own weights (model: fine-tuning, for a pretrained model)."""

    epochs: int = 8
    """LDS (CLI): epochs of the built-in trainer (AdamW, one-cycle learning rate, the demo's)."""

    batch_size: int = 32
    """LDS and planted (CLI): sequences per training step."""

    learning_rate: float = 2e-3
    """LDS (CLI): peak learning rate of the built-in trainer."""

    weight_decay: float = 0.0
    """LDS (CLI): AdamW weight decay of the built-in trainer."""

    planted_facts: int = 8
    """Planted: invented facts ("Quenthia's national animal is the violet snow heron"), each stated by one
    synthetic document added to a copy of the corpus."""

    planted_steps: int | None = None
    """Planted: AdamW steps fine-tuning a copy of the model on the corpus with the planted documents; None = one
    epoch (every planted document seen once)."""

    planted_learning_rate: float = 1e-3
    """Planted: peak learning rate of that fine-tuning."""

    recall_k: tuple[int, ...] = (1, 10, 100)
    """Planted: recall@k of the planted sequences is reported for these k, with the mean reciprocal rank."""

    shortlist_k: int = 1000
    """Planted: candidates per fact in the BM25 shortlist of the "with shortlist" columns."""

    score_batch_size: int = 32
    """Training sequences per forward/backward while fitting and scoring."""

    def __post_init__(self) -> None:
        measurements = tuple(self.measurements) if isinstance(self.measurements, (list, tuple)) else (self.measurements,)
        object.__setattr__(self, "measurements", measurements)
        bad = [m for m in measurements if m not in MEASUREMENTS]
        _require(bool(measurements) and not bad, "evaluate.measurements",
                 f"{list(bad or measurements)} not among {', '.join(MEASUREMENTS)}")
        object.__setattr__(self, "variants", check_variant_entries(self.variants, "evaluate.variants"))
        _require(self.num_subsets >= 2, "evaluate.num_subsets", f"must be >= 2 (Spearman needs two), got {self.num_subsets}")
        _require(0 < self.fraction < 1, "evaluate.fraction", f"must be in (0, 1), got {self.fraction}")
        _require(self.retrain_seeds >= 1, "evaluate.retrain_seeds", f"must be >= 1, got {self.retrain_seeds}")
        _require(self.heldout_queries >= 0, "evaluate.heldout_queries", f"must be >= 0, got {self.heldout_queries}")
        _require(self.init in INITS, "evaluate.init", f"{self.init!r} is not one of {', '.join(INITS)}")
        for name in ("epochs", "batch_size", "planted_facts", "shortlist_k", "score_batch_size"):
            _require(getattr(self, name) > 0, f"evaluate.{name}", f"must be > 0, got {getattr(self, name)}")
        for name in ("learning_rate", "planted_learning_rate"):
            _require(getattr(self, name) > 0, f"evaluate.{name}", f"must be > 0, got {getattr(self, name)}")
        _require(self.weight_decay >= 0, "evaluate.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.planted_steps is None or self.planted_steps > 0, "evaluate.planted_steps", "must be > 0 or null")
        ks = tuple(self.recall_k) if isinstance(self.recall_k, (list, tuple)) else (self.recall_k,)
        _require(bool(ks) and all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in ks),
                 "evaluate.recall_k", f"must be a list of positive integers, got {list(ks)}")
        object.__setattr__(self, "recall_k", ks)


def check_variant_entries(entries, field: str) -> tuple:
    """Variant entries as a tuple: strategy names, or mappings {name, strategy, <FactorConfig/ScoreConfig field>: ...}."""
    entries = (entries,) if isinstance(entries, (str, dict)) else entries
    _require(isinstance(entries, (list, tuple)) and len(entries) > 0, field,
             f"give a non-empty list of strategy names or mappings, got {entries!r}")
    allowed = {f.name for f in dataclasses.fields(FactorConfig)} | {f.name for f in dataclasses.fields(ScoreConfig)}
    names = []
    for i, entry in enumerate(entries):
        where = f"{field}[{i}]"
        if isinstance(entry, str):
            _require(entry in STRATEGIES, where, f"{entry!r} is not one of {', '.join(STRATEGIES)} (or give a mapping "
                                                 f"{{name: ..., strategy: ..., <field>: ...}})")
            names.append(entry)
            continue
        _require(isinstance(entry, dict), where, f"expected a strategy name or a mapping, got {entry!r}")
        _require(isinstance(entry.get("name"), str) and bool(entry.get("name")), where,
                 "a mapping needs a name (e.g. {name: ekfac-d1e-3, strategy: ekfac, damping: 0.001})")
        unknown = sorted(set(entry) - allowed - {"name"})
        _require(not unknown, where, f"unknown field(s) {', '.join(unknown)}{did_you_mean(unknown[0], sorted(allowed)) if unknown else ''}; "
                                     f"fields of FactorConfig and ScoreConfig are allowed")
        factor_names = {f.name for f in dataclasses.fields(FactorConfig)}
        try:
            FactorConfig(**{k: v for k, v in entry.items() if k in factor_names})
            ScoreConfig(**{k: v for k, v in entry.items() if k in allowed - factor_names})
        except (ConfigError, TypeError) as error:
            raise ConfigError(f"{where}: {error}") from None
        names.append(entry["name"])
    repeated = sorted({n for n in names if names.count(n) > 1})
    _require(not repeated, field, f"variant names repeat ({', '.join(repeated)}); give each mapping its own name")
    return tuple(entries)


def did_you_mean(key: str, choices: list[str], prefix: str = "") -> str:
    """", did you mean X?" for the closest of `choices`, or nothing."""
    import difflib

    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a config dataclass (the CLI's help text)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(following, ast.Expr) \
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


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
    for key in ("layers", "formats"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    for field in dataclasses.fields(cls):
        if field.name in values:
            values[field.name] = _checked_type(field, values[field.name])
    return cls(**values)


def _checked_type(field: dataclasses.Field, value):
    """The value, if it has the field's declared type (an int is a float; None only where allowed)."""
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    allowed = [part.strip() for part in annotation.split("|")]
    if value is None:
        if "None" in allowed:
            return None
        raise ConfigError(f"{field.name}: must be given (null is not allowed here)")
    kinds = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}
    for part in allowed:
        if part == "bool" and isinstance(value, bool):
            return value
        if part == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if part == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .inf / .nan: legal floats that make every result wrong
                raise ConfigError(f"{field.name}: must be a finite number, got {value}")
            return float(value)
        if part == "str" and isinstance(value, str):
            return value
        if part.startswith("tuple") and isinstance(value, (tuple, list)):
            return tuple(value)
    wanted = " or ".join(kinds.get(part, "a list" if part.startswith("tuple") else part) for part in allowed if part != "None")
    raise ConfigError(f"{field.name}: {value!r} is not {wanted}")
