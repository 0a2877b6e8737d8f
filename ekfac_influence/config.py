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
    """Seed of the sampled labels; draws are keyed to (seed, pass, draw, sequence index)."""

    label_samples: int = 1
    """Sampled labels per position in the covariance and correction passes: a less noisy Fisher at
    label_samples× the backward cost (one forward)."""

    expected_labels: bool = False
    """The exact expectation over every class instead of sampled labels (a backward per class): for
    classifiers with few classes (one prediction per example)."""

    factor_dtype: str = "float32"
    """dtype of the stored eigenvectors and eigenvalues (accumulation is always float64)."""

    correction_order: str = "auto"
    """EK-FAC contraction order: rotate tokens first, rotate per-sequence gradients, or auto (cheaper)."""

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
        _require(self.factor_dtype in DTYPES, "factor_dtype", f"{self.factor_dtype!r} is not one of {DTYPES}")
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
    sequences the factors were fitted on (set it when the factors were fitted on a sample)."""

    def __post_init__(self) -> None:
        _require(self.rank is None or self.rank > 0, "rank", f"must be a positive integer or None, got {self.rank}")
        _require(self.compute_dtype in DTYPES, "compute_dtype", f"{self.compute_dtype!r} is not one of {DTYPES}")
        _require(self.train_size is None or self.train_size > 0, "train_size", f"must be > 0 or null, got {self.train_size}")
        _require(isinstance(self.refine_steps, int) and self.refine_steps >= 0, "refine_steps",
                 f"must be an integer >= 0, got {self.refine_steps!r}")
        _require(self.refine_batches is None or self.refine_batches > 0, "refine_batches", "must be > 0 or null")
        _require(self.refine_tolerance >= 0, "refine_tolerance", f"must be >= 0, got {self.refine_tolerance}")


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
    sequences the factors were fitted on (set it when the factors were fitted on a sample)."""

    checkpoint_seconds: float = 300.0
    """Save the scan's progress this often, so that a killed query resumes (0 = after every batch)."""

    checkpoint_batches: int | None = None
    """Save every this many batches instead of by time (None = by time)."""

    normalize: str = "none"
    """Rank by the raw score (none), by RelatIF score / √s(n) (relatif), or by the cosine
    score / (‖P^{1/2}∇f_q‖ ‖P^{1/2}∇log p(z_n)‖) (cosine); s(n) = the sequence's self-influence.
    The raw score is kept beside the normalised one."""

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
        _require(self.train_size is None or self.train_size > 0, "train_size", f"must be > 0 or null, got {self.train_size}")
        _require(isinstance(self.refine_steps, int) and self.refine_steps >= 0, "refine_steps",
                 f"must be an integer >= 0, got {self.refine_steps!r}")
        _require(self.refine_batches is None or self.refine_batches > 0, "refine_batches", "must be > 0 or null")
        _require(self.refine_tolerance >= 0, "refine_tolerance", f"must be >= 0, got {self.refine_tolerance}")


@dataclass(frozen=True)
class ModelConfig:
    """The causal LM being explained."""

    path: str = ""
    """A save_pretrained directory or a .gguf file (never downloaded)."""

    dtype: str = "float32"
    """dtype the weights are loaded in: float32, bfloat16 or float16."""

    device: str = "auto"
    """cpu, cuda, cuda:1, ... or auto (the process's GPU when there is one, else cpu)."""

    fsdp: bool = False
    """Shard the weights over the processes with FSDP2, one unit per transformer block (for models
    too large for one GPU); results are those of the unsharded model."""

    def __post_init__(self) -> None:
        _require(self.dtype in ("float32", "float64", "bfloat16", "float16"), "model.dtype",
                 f"{self.dtype!r} is not one of float32, float64, bfloat16, float16")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError(f"model.device: {self.device!r} is not a device; use cpu, cuda, cuda:N or auto") from None


@dataclass(frozen=True)
class CorpusConfig:
    """The training corpus: read with `datasets`, packed into fixed-length sequences."""

    path: str = ""
    """A JSONL, text, parquet or CSV file, a directory of such files, or a save_to_disk directory."""

    text_column: str = "text"
    """Column holding each document's text."""

    id_column: str | None = None
    """Column naming each document in provenance; None = the row number."""

    split: str = "train"
    """Split of a saved DatasetDict."""

    length: int = 512
    """Tokens per packed training sequence."""

    separate_documents: bool = False
    """Start every document in a new sequence (its last one padded) instead of packing documents end to end."""

    max_documents: int | None = None
    """Read only the first documents (a quick trial); None = all."""

    def __post_init__(self) -> None:
        _require(self.length >= 2, "corpus.length", f"must be at least 2, got {self.length}")
        _require(self.max_documents is None or self.max_documents > 0, "corpus.max_documents", "must be > 0 or null")


@dataclass(frozen=True)
class FitConfig:
    """How the fit stage feeds training sequences (the factors themselves do not depend on it)."""

    batch_size: int = 8
    """Training sequences per forward/backward."""

    num_workers: int = 0
    """DataLoader worker processes."""

    checkpoint_seconds: float = 300.0
    """Save the passes' partial sums this often, so that a killed fit resumes (0 = after every batch)."""

    checkpoint_batches: int | None = None
    """Save every this many batches instead of by time (None = by time)."""

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, "fit.batch_size", f"must be > 0, got {self.batch_size}")
        _require(self.checkpoint_seconds >= 0, "fit.checkpoint_seconds", f"must be >= 0, got {self.checkpoint_seconds}")
        _require(self.checkpoint_batches is None or self.checkpoint_batches > 0, "fit.checkpoint_batches",
                 "must be > 0 or null")
        _require(self.num_workers >= 0, "fit.num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class IndexConfig:
    """The lexical shortlist index over the packed training sequences."""

    weighting: str = "bm25"
    """bm25 (the paper's modified BM25 with binary term presence) or tfidf (scikit-learn's weighting)."""

    k1: float = 1.5
    """BM25's k1."""

    chunk_size: int = 2048
    """Sequences read per step while the index is built (memory, not results)."""

    def __post_init__(self) -> None:
        _require(self.weighting in ("bm25", "tfidf"), "index.weighting", f"{self.weighting!r} is not bm25 or tfidf")
        _require(self.k1 > 0, "index.k1", f"must be > 0, got {self.k1}")
        _require(self.chunk_size > 0, "index.chunk_size", f"must be > 0, got {self.chunk_size}")


@dataclass(frozen=True)
class QueriesConfig:
    """Which queries the query stage answers, and under which name their results are kept."""

    file: str | None = None
    """JSONL of {"prompt", "completion"} (optional "contrast", "id"); or give --prompt/--completion."""

    name: str = "default"
    """The query set's directory under <run>/queries/."""

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "queries.name",
                 f"{self.name!r} is not a usable directory name")


@dataclass(frozen=True)
class ExportConfig:
    """The review report written from a query set's results."""

    formats: tuple[str, ...] = ("jsonl", "csv", "html")
    """Any of jsonl, csv, html."""

    top: int | None = None
    """Sequences per side (positive, negative) in the report; None = all that were kept."""

    def __post_init__(self) -> None:
        formats = tuple(self.formats) if isinstance(self.formats, (list, tuple)) else (self.formats,)
        object.__setattr__(self, "formats", formats)
        bad = [f for f in formats if f not in ("jsonl", "csv", "html")]
        _require(not bad and formats, "export.formats", f"{bad or formats} not among jsonl, csv, html")
        _require(self.top is None or self.top > 0, "export.top", "must be > 0 or null")


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

    duplicate_candidates: int = 200
    """Near-duplicate groups are searched among this many sequences of highest self-influence (0 = none)."""

    duplicate_threshold: float = 0.9
    """Two sequences are near-duplicates when the cosine of their P^{1/2}-whitened gradients is at least this."""

    checkpoint_seconds: float = 300.0
    """Save the pass's progress this often, so that a killed run resumes (0 = after every batch)."""

    checkpoint_batches: int | None = None
    """Save every this many batches instead of by time (None = by time)."""

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, "self_influence.batch_size", f"must be > 0, got {self.batch_size}")
        _require(self.num_workers >= 0, "self_influence.num_workers", f"must be >= 0, got {self.num_workers}")
        _require(self.compute_dtype in DTYPES, "self_influence.compute_dtype",
                 f"{self.compute_dtype!r} is not one of {DTYPES}")
        _require(self.top > 0, "self_influence.top", f"must be > 0, got {self.top}")
        _require(self.duplicate_candidates >= 0, "self_influence.duplicate_candidates",
                 f"must be >= 0, got {self.duplicate_candidates}")
        _require(-1 <= self.duplicate_threshold <= 1, "self_influence.duplicate_threshold",
                 f"must be a cosine in [-1, 1], got {self.duplicate_threshold}")
        _require(self.checkpoint_seconds >= 0, "self_influence.checkpoint_seconds",
                 f"must be >= 0, got {self.checkpoint_seconds}")
        _require(self.checkpoint_batches is None or self.checkpoint_batches > 0, "self_influence.checkpoint_batches",
                 "must be > 0 or null")


SECTIONS = {"model": ModelConfig, "corpus": CorpusConfig, "fit": FitConfig, "factors": FactorConfig,
            "index": IndexConfig, "queries": QueriesConfig, "query": QueryConfig, "export": ExportConfig,
            "self_influence": SelfInfluenceConfig}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run directory's stages need; each stage reads its own sections."""

    run: str = "runs/default"
    model: ModelConfig = ModelConfig()
    corpus: CorpusConfig = CorpusConfig()
    fit: FitConfig = FitConfig()
    factors: FactorConfig = FactorConfig()
    index: IndexConfig = IndexConfig()
    queries: QueriesConfig = QueriesConfig()
    query: QueryConfig = QueryConfig()
    export: ExportConfig = ExportConfig()
    self_influence: SelfInfluenceConfig = SelfInfluenceConfig()

    def to_dict(self) -> dict:
        return {"run": self.run, **{name: to_dict(getattr(self, name)) for name in SECTIONS}}


def run_config_from_dict(values: dict, *, source: str = "config") -> RunConfig:
    """RunConfig from nested dicts; unknown sections and keys are named with a "did you mean"."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (run, model, corpus, ...), got {type(values).__name__}")
    known = ["run", *SECTIONS]
    for key in values:
        if key not in known:
            raise ConfigError(f"{source}: unknown section {key!r}{_did_you_mean(key, known)}; sections: {', '.join(known)}")
    sections = {}
    for name, cls in SECTIONS.items():
        section = values.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {section!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in section:
            if key not in names:
                raise ConfigError(f"{source}: unknown key {name}.{key}{_did_you_mean(key, names, prefix=name + '.')}")
        try:
            sections[name] = from_dict(cls, section)
        except ConfigError as error:
            message = str(error)
            raise ConfigError(f"{source}: {message if message.startswith(name + '.') else name + '.' + message}") from None
        except TypeError as error:
            raise ConfigError(f"{source}: section {name}: {error}") from None
    run = values.get("run", RunConfig.run)
    _require(isinstance(run, str) and bool(run), "run", f"must be a directory path, got {run!r}")
    return RunConfig(run=run, **sections)


def _did_you_mean(key: str, choices: list[str], prefix: str = "") -> str:
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
            return float(value)
        if part == "str" and isinstance(value, str):
            return value
        if part.startswith("tuple") and isinstance(value, (tuple, list)):
            return tuple(value)
    wanted = " or ".join(kinds.get(part, "a list" if part.startswith("tuple") else part) for part in allowed if part != "None")
    raise ConfigError(f"{field.name}: {value!r} is not {wanted}")


def load_run_config(path: str | None = None, overrides: list[tuple[str, str]] = ()) -> RunConfig:
    """A RunConfig from a YAML file (optional) and dotted overrides such as ("query.rank", "64").

    Override values are parsed as YAML scalars or lists: "64" is an int, "null" is None,
    "[gate_proj, up_proj]" a list.
    """
    import yaml

    values: dict = {}
    source = "command line"
    if path is not None:
        from pathlib import Path

        file = Path(path)
        if not file.exists():
            raise ConfigError(f"config file {file} does not exist")
        try:
            values = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"config file {file} is not valid YAML{where}: {problem}") from None
        source = str(file)
        if not isinstance(values, dict):
            raise ConfigError(f"{file}: expected a mapping of sections (run, model, corpus, ...)")
    for dotted, raw in overrides:
        parts = dotted.split(".")
        if parts == ["run"]:
            values["run"] = raw  # a path, taken as written
            continue
        try:
            value = yaml.safe_load(raw) if isinstance(raw, str) else raw
        except yaml.YAMLError:
            value = raw
        if len(parts) != 2:
            raise ConfigError(f"override --{dotted}: expected --section.key (e.g. --query.rank 64)")
        section = values.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"override --{dotted}: section {parts[0]!r} is not a mapping")
        section[parts[1]] = value
    return run_config_from_dict(values, source=source)


def save_run_config(config: RunConfig) -> str:
    """The resolved config as YAML (saved in the run directory by every stage)."""
    import yaml

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return yaml.safe_dump(plain(config.to_dict()), sort_keys=False)
