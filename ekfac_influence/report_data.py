"""The records of a query set, as the report reads them: checked, trimmed, flattened into rows.

Input: a query set's directory (docs/design.md §4 `queries/<set>/`) holding `topk.jsonl`, one
record per query with its most positive (helpful) and most negative (harmful) training sequences,
each with per-layer and per-token influence, and `manifest.json`. No torch here: reading JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TOPK_FILE, MANIFEST_FILE = "topk.jsonl", "manifest.json"
SIDES = (("positive", "top_positive"), ("negative", "top_negative"))
QUERY_KEYS = {"query", "id", "prompt", "completion", "contrast", "generated", "logp", "prompt_tokens",
              "completion_tokens", "num_candidates", "top_positive", "top_negative"}
HIT_KEYS = {"rank", "sequence", "score", "delta_logp", "spurious", "per_layer", "per_token", "tokens", "text",
            "provenance"}
ROW_FIELDS = ["query", "query_id", "prompt", "completion", "contrast", "generated", "logp", "side", "rank",
              "sequence", "score", "delta_logp", "spurious", "documents", "provenance", "per_layer", "text"]


class ReportError(ValueError):
    """The query results cannot be read, or the report would overwrite an earlier one."""


# ----------------------------------------------------------------------------- reading


def read_records(query_dir) -> list[dict]:
    """The records of `topk.jsonl`, checked enough that rendering cannot fail half-way."""
    path = Path(query_dir) / TOPK_FILE
    if not path.is_file():
        raise ReportError(f"{path}: not found (a query set's directory holds {TOPK_FILE}; run the query stage first)")
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                _check_record(record)
            except (json.JSONDecodeError, TypeError, ValueError) as error:
                raise ReportError(f"{path}, line {line_number}: malformed record: {error}") from None
            records.append(record)
    return records


def _check_record(record) -> None:
    if not isinstance(record, dict):
        raise TypeError(f"expected a JSON object, got {type(record).__name__}")
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{key!r} must be a string")
    for _, key in SIDES:
        hits = record.get(key, [])
        if not isinstance(hits, list) or not all(isinstance(hit, dict) for hit in hits):
            raise ValueError(f"{key!r} must be a list of objects")
        for hit in hits:
            if not isinstance(hit.get("score"), (int, float)):
                raise ValueError(f"every hit in {key!r} needs a numeric 'score'")


def read_manifest(query_dir) -> dict:
    path = Path(query_dir) / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: malformed JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return manifest


def read_model(query_dir, manifest: dict | None = None) -> str | None:
    """The model's name or path, as the run gave it: the query set's manifest ("model"), else the run's
    manifest, else `model.path` of the run's saved config (`config.query.yaml`, then `config.fit.yaml`).

    A query set inside a run sits at `<run>/queries/<set>/`; one written elsewhere has no run to ask.
    None when nothing names the model (the page then shows only its fingerprint).
    """
    query_dir = Path(query_dir)
    named = _model_name((manifest if manifest is not None else read_manifest(query_dir)).get("model"))
    if named or query_dir.parent.name != "queries":
        return named
    run = query_dir.parent.parent
    try:
        named = _model_name(json.loads((run / MANIFEST_FILE).read_text(encoding="utf-8")).get("model"))
    except (OSError, ValueError, AttributeError):
        named = None
    for stage in ("query", "fit"):
        if named:
            break
        try:
            config = yaml.safe_load((run / f"config.{stage}.yaml").read_text(encoding="utf-8"))
            named = _model_name((config.get("model") or {}).get("path"))
        except (OSError, yaml.YAMLError, AttributeError):
            continue
    return named


def _model_name(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("path", value.get("name"))
    return str(value) if isinstance(value, (str, Path)) and str(value) else None


def limit_hits(records: list[dict], top: int | None) -> list[dict]:
    """The records with at most `top` sequences per side (all of them when top is None)."""
    if top is None:
        return records
    if top < 0:
        raise ReportError(f"top must be >= 0, got {top}")
    return [{**record, **{key: record.get(key, [])[:top] for _, key in SIDES}} for record in records]


# ----------------------------------------------------------------------------- flat rows (JSONL, CSV)


def flat_rows(records: list[dict]) -> list[dict]:
    """One row per (query, side, hit); no per-token values. Unknown scalar keys ride along."""
    rows = []
    for record in records:
        for side, key in SIDES:
            for hit in record.get(key, []):
                provenance = hit.get("provenance") or []
                rows.append({
                    "query": record.get("query"), "query_id": record.get("id"), "prompt": record["prompt"],
                    "completion": record["completion"], "contrast": record.get("contrast"),
                    "generated": record.get("generated"), "logp": record.get("logp"), "side": side,
                    "rank": hit.get("rank"), "sequence": hit.get("sequence"), "score": hit["score"],
                    "delta_logp": hit.get("delta_logp"), "spurious": hit.get("spurious"),
                    "documents": "; ".join(dict.fromkeys(doc_id(piece) for piece in provenance)),
                    "provenance": provenance, "per_layer": hit.get("per_layer") or {}, "text": hit.get("text", ""),
                    **extras(record, QUERY_KEYS), **extras(hit, HIT_KEYS)})
    return rows


def extras(mapping: dict, known: set) -> dict:
    """Keys this module does not know whose values are scalars or lists of scalars."""
    return {key: value for key, value in mapping.items()
            if key not in known and key not in ROW_FIELDS and _is_plain(value)}


def _is_plain(value) -> bool:
    scalar = (str, int, float, bool, type(None))
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))


def doc_id(piece) -> str:
    if not isinstance(piece, dict):
        return str(piece)
    return str(piece.get("doc", piece.get("topic", "?")))


def provenance_text(provenance: list) -> str:
    """`doc:row[c0:c1]; ...`: document, row in the corpus, character span in that document."""
    parts = []
    for piece in provenance or []:
        if not isinstance(piece, dict):
            parts.append(str(piece))
            continue
        text = doc_id(piece) + (f":{piece['row']}" if piece.get("row") is not None else "")
        span = piece.get("char_span")
        parts.append(text + (f"[{span[0]}:{span[1]}]" if isinstance(span, list) and len(span) == 2 else ""))
    return "; ".join(parts)
