"""Review exports of a query run: flat JSONL and CSV rows, and one self-contained HTML page.

Reading and flattening the records is `report_data`'s; the page is `report_html`'s. This module
renders the rows and writes the files, each atomically.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .files import atomic_write_text
from .report_data import ROW_FIELDS, ReportError, flat_rows, limit_hits, provenance_text, read_manifest, read_model
from .report_data import read_records
from .report_html import render_html

__all__ = ["REPORT_FILES", "ReportError", "export_report", "render_csv", "render_html", "render_jsonl"]

REPORT_FILES = {"jsonl": "report.jsonl", "csv": "report.csv", "html": "report.html"}


def render_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def render_csv(rows: list[dict]) -> str:
    extra = list(dict.fromkeys(key for row in rows for key in row if key not in ROW_FIELDS))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=ROW_FIELDS + extra, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = {**row, "provenance": provenance_text(row["provenance"]),
                 "per_layer": json.dumps(row["per_layer"], ensure_ascii=False)}
        writer.writerow({key: json.dumps(value) if isinstance(value, list) else value for key, value in cells.items()})
    return out.getvalue()


def export_report(query_dir, *, formats=("jsonl", "csv", "html"), out_dir=None, top: int | None = None,
                  overwrite: bool = False) -> dict[str, Path]:
    """Write report.jsonl / report.csv / report.html for the query set in `query_dir`.

    out_dir defaults to query_dir; `top` keeps at most that many sequences per side. Each file is
    written to a temporary name and renamed into place. Nothing is written when any requested file
    already exists and overwrite is False. Returns {format: path}.
    """
    query_dir = Path(query_dir)
    if query_dir.is_file():  # the topk.jsonl itself
        query_dir = query_dir.parent
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in REPORT_FILES]
    if unknown:
        raise ReportError(f"unknown report format(s) {unknown}; choose from {sorted(REPORT_FILES)}")
    out_dir = query_dir if out_dir is None else Path(out_dir)
    paths = {f: out_dir / REPORT_FILES[f] for f in formats}
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not overwrite:
        raise ReportError(f"{', '.join(existing)} already exists; pass overwrite=True (--overwrite on the "
                          "command line) to replace it")
    records = limit_hits(read_records(query_dir), top)
    manifest = read_manifest(query_dir)
    model = read_model(query_dir, manifest)
    manifest = {**manifest, "model": model} if model else manifest
    rows = flat_rows(records) if {"jsonl", "csv"} & set(formats) else []
    render = {"jsonl": lambda: render_jsonl(rows), "csv": lambda: render_csv(rows),
              "html": lambda: render_html(records, manifest)}
    for fmt, path in paths.items():
        _atomic_write(path, render[fmt]())
    return paths


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_text(path, text)  # with the user's umask (files.py)
