"""The evaluation's results table: one row per variant, as text, as `evaluation.json` and as a standalone HTML page.

Columns: LDS ± SE over queries; planted-fact recall@k and MRR ± SE over facts, over all sequences
and within the BM25 shortlist. The page has no script and loads nothing; every text is escaped.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from .storage import atomic_write_text
from .version import __version__

JSON_FILE, HTML_FILE = "evaluation.json", "evaluation.html"


def _cell(value) -> str:
    """'0.812 ± 0.021' from a {mean, se} mapping (or a (mean, se, count) list); '—' when missing."""
    if value is None:
        return "—"
    mean, se = (value["mean"], value["se"]) if isinstance(value, dict) else (value[0], value[1])
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return f"{mean:.3f} ± {se:.3f}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): the variants of the LDS and of the planted-fact recall, side by side."""
    lds = results.get("lds") or {}
    planted = results.get("planted") or {}
    ks = planted.get("ks", [])
    header = ["variant"]
    if lds:
        header.append("LDS")
    scopes = [s for s in ("all", "shortlist") if any(s in v for v in planted.get("variants", {}).values())]
    for scope in scopes:
        suffix = "" if scope == "all" else " (shortlist)"
        header += [f"recall@{k}{suffix}" for k in ks] + [f"MRR{suffix}"]
    names = list(lds.get("variants", {})) + list(lds.get("skipped", {}))
    names += [n for n in list(planted.get("variants", {})) + list(planted.get("skipped", {})) if n not in names]
    rows = []
    for name in names:
        row = [name]
        if lds:
            row.append(_cell(lds["variants"].get(name)) if name in lds.get("variants", {})
                       else "skipped" if name in lds.get("skipped", {}) else "—")
        found = planted.get("variants", {}).get(name)
        for scope in scopes:
            metrics = (found or {}).get(scope)
            cells = [_cell(metrics.get(f"recall@{k}")) if metrics else "—" for k in ks]
            cells.append(_cell(metrics.get("mrr")) if metrics else "—")
            if found is None and name in planted.get("skipped", {}):
                cells = ["skipped"] * len(cells)
            row += cells
        rows.append(row)
    return header, rows


def format_table(results: dict) -> str:
    """The table as aligned text, with one line per skipped variant saying why."""
    header, rows = table_rows(results)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header] + rows]
    for section in ("lds", "planted"):
        for name, why in ((results.get(section) or {}).get("skipped") or {}).items():
            lines.append(f"{name} skipped ({section}): {why}")
    return "\n".join(lines)


def _settings(results: dict) -> list[str]:
    notes = []
    lds = results.get("lds")
    if lds:
        agreement = lds.get("seed_agreement")
        notes.append(f"LDS: Spearman correlation over {lds['num_subsets']} subsets of {lds['num_train']} training "
                     f"sequences (fraction {lds['fraction']}), {lds['retrain_seeds']} retraining seed(s) per subset, "
                     f"mean ± standard error over {lds['num_queries']} queries"
                     + (f"; seed agreement {agreement['mean']:.3f}" if agreement else "") + ".")
    planted = results.get("planted")
    if planted:
        notes.append(f"Planted facts: {planted['num_facts']} invented facts among {planted['num_sequences']} sequences, "
                     f"{planted.get('fine_tune_steps', '?')} fine-tuning steps; shortlist = BM25 top "
                     f"{planted.get('shortlist_k', '?')}; mean ± standard error over facts.")
    return notes


def html_page(results: dict) -> str:
    """A standalone page: the table and how it was measured, escaped, no script, nothing fetched."""
    header, rows = table_rows(results)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    notes = "".join(f"<p>{html.escape(n)}</p>" for n in _settings(results))
    title = html.escape(results.get("title", "ekfac_influence evaluation"))
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>body{{font-family:system-ui,sans-serif;margin:2em}}"
            "table{border-collapse:collapse}th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}"
            "td:first-child,th:first-child{text-align:left}</style></head><body>"
            f"<h1>{title}</h1>{notes}<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"
            f"<p>ekfac_influence {html.escape(__version__)}</p></body></html>\n")


def write_evaluation(directory, results: dict) -> dict[str, Path]:
    """evaluation.json and evaluation.html in `directory`, each written atomically."""
    directory = Path(directory)
    results = plain({"kind": "ekfac_influence.evaluation", "version": __version__, **results})
    atomic_write_text(directory / JSON_FILE, json.dumps(results, indent=2, allow_nan=False))
    atomic_write_text(directory / HTML_FILE, html_page(results))
    return {"json": directory / JSON_FILE, "html": directory / HTML_FILE}


def plain(value):
    """JSON-ready: named tuples as mappings, arrays as lists, NaN and infinities as None."""
    if hasattr(value, "_asdict"):
        return plain(value._asdict())
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
