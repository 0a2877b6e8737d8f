"""A query set's results as pandas DataFrames, for analysis in a notebook (no torch, no model).

    results = ei.load_results("runs/demo", "demo", per_layer=True, per_token=True)
    results.hits         # one row per (query, sequence) kept: query_id, side, rank, sequence, score, ...
    results.queries      # one row per query: id, prompt, completion, contrast, generated, logp, num_candidates
    results.per_layer    # aligned with hits (same index): one column per tracked layer, the score through it
    results.per_token    # one row per (hit, position): the score that flows through the token at that position

Read from `queries/<set>/topk.jsonl` (docs/design.md §4) as the query stage wrote it: the most
positive and most negative sequences of each query, `top_k` per side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .report_data import ReportError, flat_rows, read_manifest, read_records

__all__ = ["Results", "load_results", "query_set_directory"]

QUERY_COLUMNS = ["id", "prompt", "completion", "contrast", "generated", "logp", "prompt_tokens", "completion_tokens",
                 "num_candidates"]


@dataclass
class Results:
    """A query set's results; `per_layer` and `per_token` are None unless asked for."""

    hits: pd.DataFrame
    queries: pd.DataFrame
    manifest: dict
    per_layer: pd.DataFrame | None = None
    per_token: pd.DataFrame | None = None

    def __repr__(self) -> str:
        extra = [name for name in ("per_layer", "per_token") if getattr(self, name) is not None]
        return (f"Results({len(self.queries)} queries, {len(self.hits)} hits, strategy "
                f"{self.manifest.get('strategy', '?')}{', with ' + ' and '.join(extra) if extra else ''})")


def query_set_directory(run, queries_name: str = "default") -> Path:
    """`<run>/queries/<queries_name>`, or a clear error naming the query sets that do exist."""
    run = Path(run)
    if not run.is_dir():
        raise ReportError(f"run directory {run} does not exist")
    path = run / "queries" / str(queries_name)
    if not (path / "topk.jsonl").is_file():
        sets = sorted(p.name for p in (run / "queries").glob("*") if (p / "topk.jsonl").is_file())
        raise ReportError(f"{path} holds no finished query set; "
                          + (f"query sets in {run}: {', '.join(sets)}" if sets else f"{run} has none yet (run the query stage)"))
    return path


def load_results(run, queries_name: str = "default", *, per_layer: bool = False, per_token: bool = False) -> Results:
    """The results of query set `queries_name` of the run directory `run` as DataFrames (see the module docstring).

    hits columns: query (index), query_id, prompt, completion, contrast, generated, logp, side
    ("positive" = helpful, "negative" = harmful), rank (1 = strongest on its side), sequence (row of
    the packed corpus), score, delta_logp (score / N: the change of log p(completion) from one more
    copy of the sequence), spurious, documents, provenance (list of {doc, row, token_span,
    char_span}), text, and any extra keys the records hold (normalized_score, ...).
    """
    path = query_set_directory(run, queries_name)
    records = read_records(path)
    rows = flat_rows(records)
    hits = pd.DataFrame(rows, columns=None if rows else ["query", "query_id", "side", "rank", "sequence", "score"])
    layers = hits.pop("per_layer") if "per_layer" in hits else pd.Series([{}] * len(hits), dtype=object)
    queries = pd.DataFrame([{key: record.get(key) for key in QUERY_COLUMNS} for record in records], columns=QUERY_COLUMNS)
    results = Results(hits, queries, read_manifest(path))
    if per_layer:
        results.per_layer = pd.DataFrame(list(layers), index=hits.index)
    if per_token:
        results.per_token = _per_token(records)
    return results


def _per_token(records: list[dict]) -> pd.DataFrame:
    """One row per (query, side, rank, position): the token as stored and the influence through its position."""
    rows = []
    for record in records:
        for side, key in (("positive", "top_positive"), ("negative", "top_negative")):
            for hit in record.get(key, []):
                tokens = hit.get("tokens") or []
                for position, value in enumerate(hit.get("per_token") or []):
                    rows.append((record.get("id"), side, hit.get("rank"), hit.get("sequence"), position,
                                 tokens[position] if position < len(tokens) else None, value))
    return pd.DataFrame(rows, columns=["query_id", "side", "rank", "sequence", "position", "token", "score"])
