"""A run's config file: the run directory's sections, YAML with dotted overrides, the resolved copy.

    run: runs/audit            # then one section per stage; every field documented in its dataclass
    model: {path: ..., dtype: bfloat16}
    corpus: {path: ..., length: 512}
    factors: {strategy: ekfac}  # FactorConfig (config.py), like query, self_influence and evaluate

Unknown sections and keys are named with a "did you mean"; each field's docstring is its CLI help.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import (CANDIDATES, CORRECTION_ORDERS, DTYPES, INITS, NORMALIZATIONS, SHARDINGS, STRATEGIES, ConfigError,
                     EvaluateConfig, FactorConfig, QueryConfig, SelfInfluenceConfig, _require, did_you_mean, from_dict,
                     to_dict)
from .files import NotTextError, read_utf8

MODEL_DTYPES = ("float32", "float64", "bfloat16", "float16")
WEIGHTINGS = ("bm25", "tfidf")


@dataclass(frozen=True)
class ModelConfig:
    """The causal LM being explained."""

    path: str = ""
    """A save_pretrained directory, a .gguf file, or a Hugging Face id already in the local cache
    (e.g. openai-community/gpt2; never downloaded)."""

    dtype: str = "float32"
    """dtype the weights are loaded in: float32, bfloat16 or float16."""

    device: str = "auto"
    """cpu, cuda, cuda:1, ... or auto (the process's GPU when there is one, else cpu)."""

    fsdp: bool = False
    """Shard the weights over the processes with FSDP2, one unit per transformer block (for models
    too large for one GPU); results are those of the unsharded model."""

    def __post_init__(self) -> None:
        _require(self.dtype in MODEL_DTYPES, "model.dtype", f"{self.dtype!r} is not one of {', '.join(MODEL_DTYPES)}")
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
    """BM25's term-frequency saturation, (k1 + 1) e / (k1 + e). With the binary term presence e ∈ {0, 1}
    used here (the paper's BM25) a present term weighs exactly IDF whatever k1 is, so k1 changes no
    score; it is kept for the formula and recorded in the index manifest."""

    chunk_size: int = 2048
    """Sequences read per step while the index is built (memory, not results)."""

    def __post_init__(self) -> None:
        _require(self.weighting in WEIGHTINGS, "index.weighting", f"{self.weighting!r} is not bm25 or tfidf")
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


CHOICES = {  # (section, field) -> the values it accepts: the CLI shows them as {a,b,...}
    ("factors", "strategy"): STRATEGIES, ("factors", "factor_dtype"): DTYPES, ("factors", "correction_order"): CORRECTION_ORDERS,
    ("factors", "accumulate_dtype"): DTYPES, ("factors", "shard"): SHARDINGS,
    ("query", "compute_dtype"): DTYPES, ("query", "candidates"): CANDIDATES, ("query", "normalize"): NORMALIZATIONS,
    ("self_influence", "compute_dtype"): DTYPES, ("evaluate", "init"): INITS, ("model", "dtype"): MODEL_DTYPES,
    ("index", "weighting"): WEIGHTINGS,
}

SECTIONS = {"model": ModelConfig, "corpus": CorpusConfig, "fit": FitConfig, "factors": FactorConfig,
            "index": IndexConfig, "queries": QueriesConfig, "query": QueryConfig, "export": ExportConfig,
            "self_influence": SelfInfluenceConfig, "evaluate": EvaluateConfig}


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
    evaluate: EvaluateConfig = EvaluateConfig()

    def to_dict(self) -> dict:
        return {"run": self.run, **{name: to_dict(getattr(self, name)) for name in SECTIONS}}


def run_config_from_dict(values: dict, *, source: str = "config") -> RunConfig:
    """RunConfig from nested dicts; unknown sections and keys are named with a "did you mean"."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (run, model, corpus, ...), got {type(values).__name__}")
    known = ["run", *SECTIONS]
    for key in values:
        if key not in known:
            raise ConfigError(f"{source}: unknown section {key!r}{did_you_mean(key, known)}; sections: {', '.join(known)}")
    sections = {}
    for name, cls in SECTIONS.items():
        section = values.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {section!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in section:
            if key not in names:
                raise ConfigError(f"{source}: unknown key {name}.{key}{did_you_mean(key, names, prefix=name + '.')}")
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


PATH_FIELDS = (("model", "path"), ("corpus", "path"), ("queries", "file"))  # inputs a config may name by path


def load_run_config(path: str | None = None, overrides: list[tuple[str, str]] = ()) -> RunConfig:
    """A RunConfig from a YAML file (optional) and dotted overrides such as ("query.rank", "64").

    Relative paths in the file are relative to the file's directory: `run` always; model.path,
    corpus.path and queries.file when they exist there (else they are taken as written: a path from
    the working directory, or a Hugging Face id in the local cache). Paths on the command line are
    relative to the working directory. Override values are parsed as YAML scalars or lists: "64" is
    an int, "null" is None, "[gate_proj, up_proj]" a list.
    """
    import yaml

    values: dict = {}
    source = "command line"
    if path is not None:
        from pathlib import Path

        file = Path(path)
        if not file.exists():
            raise ConfigError(f"config file {file} does not exist")
        if not file.is_file():
            raise ConfigError(f"config file {file} is not a file; give a YAML file")
        try:
            values = yaml.load(read_utf8(file, "config file"), Loader=_unique_key_loader(str(file))) or {}
        except NotTextError as error:
            raise ConfigError(str(error)) from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"config file {file} is not valid YAML{where}: {problem}") from None
        source = str(file)
        if not isinstance(values, dict):
            raise ConfigError(f"{file}: expected a mapping of sections (run, model, corpus, ...)")
        values = _relative_to(values, file.parent)
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


def _unique_key_loader(name: str):
    """A yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: PyYAML's own error says it
                    continue
                if first != key_node.start_mark.line + 1:
                    raise ConfigError(f"config file {name}: key {key!r} appears twice (lines "
                                      f"{first} and {key_node.start_mark.line + 1}); the second would silently "
                                      f"replace the first: merge them")
            return super().construct_mapping(node, deep=deep)

    return Loader


def _is_relative_path(value) -> bool:
    import os

    return isinstance(value, str) and bool(value) and ":" not in value and not os.path.isabs(os.path.expanduser(value))


def _relative_to(values: dict, base) -> dict:
    """The file's values with its relative paths joined to `base` (the config file's directory)."""
    import os

    values = {key: dict(value) if isinstance(value, dict) else value for key, value in values.items()}
    if _is_relative_path(values.get("run")):
        values["run"] = os.path.normpath(os.path.join(base, values["run"]))
    for section, key in PATH_FIELDS:
        entry = values.get(section)
        if isinstance(entry, dict) and _is_relative_path(entry.get(key)):
            joined = os.path.normpath(os.path.join(base, entry[key]))
            if os.path.exists(joined):
                entry[key] = joined
    return values


def save_run_config(config: RunConfig) -> str:
    """The resolved config as YAML, for the run directory: it works from there, wherever the directory goes.

    `run` is "." (the file's own directory); a path inside the run directory is written relative to
    it, any other existing path absolute, and a name that is no local path (a Hugging Face id,
    pydoc:topics, package:...) as it is. Loaded with load_run_config, the copy resolves them again.
    """
    import os

    import yaml

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    values = plain(config.to_dict())
    run = os.path.realpath(config.run)
    values["run"] = "."
    for section, key in PATH_FIELDS:
        value = values[section][key]
        if _is_relative_path(value) or (isinstance(value, str) and os.path.isabs(value)):
            if os.path.exists(value):
                absolute = os.path.realpath(value)
                inside = absolute == run or absolute.startswith(run + os.sep)
                values[section][key] = os.path.relpath(absolute, run) if inside else absolute
    header = ("# the resolved config of this run: paths are relative to this file's directory (the run directory)\n"
              "# e.g. ekfac-influence export --config <run>/config.query.yaml\n")
    return header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
