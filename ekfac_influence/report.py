"""Review exports of a query run: flat JSONL and CSV rows, and one self-contained HTML page.

Input: a query set's directory (DESIGN §4 `queries/<set>/`) holding `topk.jsonl`, one record per
query with its most positive (helpful) and most negative (harmful) training sequences, each with
per-layer and per-token influence, and `manifest.json`. No torch here: reading JSON, writing text.

The HTML page shades each token t of a sequence by its influence a_t, red for a_t > 0 and teal for
a_t < 0 (Grosse et al., 2023), with alpha ∝ |a_t| / max_t |a_t| within that sequence. Every string
that comes from data (training text, tokens, prompts, document ids) goes through `html.escape`; the
page loads nothing from the network, and a Content-Security-Policy allows only its own script (by
hash), so an injected `<script>` or `onerror=` would not run even if escaping failed.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import math
import os
import re
import tempfile
from html import escape
from pathlib import Path

TOPK_FILE, MANIFEST_FILE = "topk.jsonl", "manifest.json"
REPORT_FILES = {"jsonl": "report.jsonl", "csv": "report.csv", "html": "report.html"}
SIDES = (("positive", "top_positive"), ("negative", "top_negative"))
QUERY_KEYS = {"query", "id", "prompt", "completion", "contrast", "generated", "logp", "prompt_tokens",
              "completion_tokens", "num_candidates", "top_positive", "top_negative"}
HIT_KEYS = {"rank", "sequence", "score", "delta_logp", "spurious", "per_layer", "per_token", "tokens", "text",
            "provenance"}
ROW_FIELDS = ["query", "query_id", "prompt", "completion", "contrast", "generated", "logp", "side", "rank",
              "sequence", "score", "delta_logp", "spurious", "documents", "provenance", "per_layer", "text"]
RED, TEAL = (239, 68, 68), (20, 184, 166)  # positive, negative: the paper's colours
MAX_ALPHA = 0.85  # a fully shaded token must still be readable


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
                    "documents": "; ".join(dict.fromkeys(_doc_id(piece) for piece in provenance)),
                    "provenance": provenance, "per_layer": hit.get("per_layer") or {}, "text": hit.get("text", ""),
                    **_extras(record, QUERY_KEYS), **_extras(hit, HIT_KEYS)})
    return rows


def _extras(mapping: dict, known: set) -> dict:
    """Keys this module does not know whose values are scalars or lists of scalars."""
    return {key: value for key, value in mapping.items()
            if key not in known and key not in ROW_FIELDS and _is_plain(value)}


def _is_plain(value) -> bool:
    scalar = (str, int, float, bool, type(None))
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))


def _doc_id(piece) -> str:
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
        text = _doc_id(piece) + (f":{piece['row']}" if piece.get("row") is not None else "")
        span = piece.get("char_span")
        parts.append(text + (f"[{span[0]}:{span[1]}]" if isinstance(span, list) and len(span) == 2 else ""))
    return "; ".join(parts)


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


# ----------------------------------------------------------------------------- export


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
    rows = flat_rows(records) if {"jsonl", "csv"} & set(formats) else []
    render = {"jsonl": lambda: render_jsonl(rows), "csv": lambda: render_csv(rows),
              "html": lambda: render_html(records, manifest)}
    for fmt, path in paths.items():
        _atomic_write(path, render[fmt]())
    return paths


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- HTML


def render_html(records: list[dict], manifest: dict) -> str:
    """One self-contained page: inline style and script only, every data string escaped."""
    layer_order = [str(name) for name in manifest.get("layers") or []]
    queries = "\n".join(_query_html(i, record, layer_order) for i, record in enumerate(records))
    nav = "\n".join(f'<a href="#q-{i}" data-target="q-{i}"><b>{escape(_query_label(i, r))}</b> '
                    f'{escape(_clip(r["prompt"] + r["completion"], 60))}</a>' for i, r in enumerate(records))
    csp = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()}'; "
           "base-uri 'none'; form-action 'none'")
    parts = {"csp": escape(csp, quote=False), "style": STYLE, "script": SCRIPT, "summary": _summary_html(manifest, records),
             "nav": nav or '<p class="empty">no queries</p>',
             "queries": queries or '<p class="empty">This query set has no queries.</p>'}
    # one pass, so a placeholder-like string inside the data is never substituted again
    return re.sub(r"\{(" + "|".join(parts) + r")\}", lambda match: parts[match.group(1)], PAGE)


def _query_label(i: int, record: dict) -> str:
    return str(record.get("id") if record.get("id") is not None else f"q{record.get('query', i)}")


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _sci(value, sign: bool = True) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return "n/a"
    return f"{value:+.3e}" if sign else f"{value:.3e}"


def _summary_html(manifest: dict, records: list[dict]) -> str:
    fingerprint = manifest.get("fingerprint")
    items = [("strategy", manifest.get("strategy")), ("queries", len(records)),
             ("training sequences", manifest.get("num_train_sequences")),
             ("tracked layers", len(manifest["layers"]) if isinstance(manifest.get("layers"), list) else None),
             ("model", str(fingerprint)[:12] if fingerprint else None)]
    legend = ('<span class="legend"><i class="swatch pos"></i>raised log p of the completion '
              '<i class="swatch neg"></i>lowered it</span>')
    return " · ".join(f"<span>{escape(k)} <b>{escape(str(v))}</b></span>" for k, v in items if v is not None) + legend


def _details_html(mapping: dict, known: set) -> str:
    extras = _extras(mapping, known | set(ROW_FIELDS))
    if not extras:
        return ""
    parts = [f"<span>{escape(str(k))}: <b>{escape(', '.join(map(str, v)) if isinstance(v, list) else str(v))}</b></span>"
             for k, v in extras.items()]
    return f'<div class="details">{" ".join(parts)}</div>'


def _query_html(i: int, record: dict, layer_order: list[str]) -> str:
    badges = '<span class="badge gen" title="the model\'s own greedy completion">generated</span>' \
        if record.get("generated") else ""
    contrast = record.get("contrast")
    contrast_html = (f'<div class="contrast"><span class="label">contrast</span><span class="completion">'
                     f'{escape(contrast)}</span></div>') if isinstance(contrast, str) else ""
    measured = "log p(completion) − log p(contrast)" if isinstance(contrast, str) else "log p(completion | prompt)"
    logp = record.get("logp")
    meta = [f'<span title="{escape(measured)}">log p <b>{logp:.4g}</b></span>' if isinstance(logp, (int, float)) else "",
            f"<span>{escape(str(record['prompt_tokens']))} prompt + {escape(str(record.get('completion_tokens', '?')))}"
            f" completion tokens</span>" if record.get("prompt_tokens") is not None else "",
            f"<span><b>{escape(str(record['num_candidates']))}</b> candidates scored</span>"
            if record.get("num_candidates") is not None else ""]
    sides = "".join(_side_html(side, record.get(key, []), layer_order) for side, key in SIDES)
    return (f'<section class="query" id="q-{i}" tabindex="-1">'
            f'<h2><span class="qid">{escape(_query_label(i, record))}</span>{badges}</h2>'
            f'<div class="pc"><span class="label">prompt</span><span class="prompt">{escape(record["prompt"])}</span>'
            f'<span class="label">completion</span><span class="completion">{escape(record["completion"])}</span></div>'
            f'{contrast_html}<div class="meta">{" ".join(m for m in meta if m)}</div>'
            f'{_details_html(record, QUERY_KEYS)}{sides}</section>')


def _side_html(side: str, hits: list[dict], layer_order: list[str]) -> str:
    title = "Most helpful sequences (positive influence)" if side == "positive" else \
        "Most harmful sequences (negative influence)"
    body = "".join(_hit_html(side, hit, layer_order) for hit in hits) if hits else \
        f'<li class="empty">No training sequence with {side} influence among the candidates.</li>'
    return (f'<div class="side {side}"><h3>{title} <span class="count" data-total="{len(hits)}">{len(hits)}</span>'
            f'</h3><ol class="hits">{body}</ol></div>')


def _hit_html(side: str, hit: dict, layer_order: list[str]) -> str:
    score, rank = hit["score"], hit.get("rank")
    spurious = bool(hit.get("spurious"))
    badge = ('<span class="badge spur" title="token influence concentrated on very few tokens '
             '(‖a‖₂/‖a‖₁ above the threshold): often an artefact, not a real explanation">spurious</span>'
             if spurious else "")
    provenance = hit.get("provenance") or []
    prov = "; ".join(_provenance_html(piece) for piece in provenance)
    return (f'<li class="hit {side}" tabindex="-1" data-score="{float(score)!r}" data-rank="{escape(str(rank))}" '
            f'data-spurious="{int(spurious)}"><div class="hit-head">'
            f'<span class="rank">#{escape(str(rank))}</span>'
            f'<span class="score" title="influence score (positive = helpful)">score <b>{_sci(score)}</b></span>'
            f'<span class="delta" title="≈ change of log p(completion) from one more copy of this sequence">'
            f'Δlog p <b>{_sci(hit.get("delta_logp"))}</b></span>'
            f'<span class="seq">seq {escape(str(hit.get("sequence")))}</span>{badge}'
            f'<span class="prov">{prov}</span></div>{_details_html(hit, HIT_KEYS)}'
            f'<div class="hit-body"><div class="tokens">{_tokens_html(hit)}</div>'
            f'{_layers_html(hit.get("per_layer") or {}, layer_order)}</div></li>')


def _provenance_html(piece) -> str:
    if not isinstance(piece, dict):
        return f'<span class="doc">{escape(str(piece))}</span>'
    title = escape(json.dumps(piece, ensure_ascii=False))
    return f'<span class="doc" title="{title}">{escape(provenance_text([piece]))}</span>'


def _tokens_html(hit: dict) -> str:
    """Token spans shaded by a_t: red (a_t > 0) or teal (a_t < 0), alpha ∝ |a_t| / max|a|."""
    tokens, values = hit.get("tokens"), hit.get("per_token")
    if not isinstance(tokens, list) or not isinstance(values, list) or not tokens:
        return escape(str(hit.get("text", "")))
    values = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in values]
    peak = max((abs(v) for v in values), default=0.0) or 1.0
    spans = []
    for t, token in enumerate(tokens):
        value = values[t] if t < len(values) else 0.0
        alpha = round(MAX_ALPHA * abs(value) / peak, 3)
        r, g, b = RED if value > 0 else TEAL
        style = f' style="background:rgba({r},{g},{b},{alpha})"' if alpha >= 0.01 else ""
        spans.append(f'<span class="tok"{style} title="{value:+.3e}">{escape(str(token))}</span>')
    return "".join(spans)


def _layers_html(per_layer: dict, layer_order: list[str]) -> str:
    """A diverging bar per layer: red to the right for positive, teal to the left for negative."""
    names = [n for n in layer_order if n in per_layer] + [n for n in per_layer if n not in layer_order]
    values = {n: per_layer[n] for n in names if isinstance(per_layer[n], (int, float))}
    if not values:
        return ""
    peak = max(abs(v) for v in values.values()) or 1.0
    prefix = _common_prefix(list(values))
    rows = []
    for name, value in values.items():
        width = round(50 * abs(value) / peak, 2)
        position = "left:50%" if value >= 0 else "right:50%"
        rows.append(f'<div class="layer" title="{escape(name)}: {value:+.3e}"><span class="lname">'
                    f'<bdi>{escape(name[len(prefix):] or name)}</bdi></span><span class="track"><span class="bar '
                    f'{"pos" if value >= 0 else "neg"}" style="{position};width:{width}%"></span></span></div>')
    return f'<div class="layers" title="influence by layer">{"".join(rows)}</div>'


def _common_prefix(names: list[str]) -> str:
    """The dotted prefix all names share (`model.layers.`), so bars are labelled by what differs."""
    if len(names) < 2:
        return ""
    parts = [name.split(".") for name in names]
    shared = []
    for pieces in zip(*parts):
        if len(set(pieces)) > 1:
            break
        shared.append(pieces[0])
    shared = shared[: min(len(p) for p in parts) - 1]
    return ".".join(shared) + "." if shared else ""


STYLE = """
:root { --red: rgb(220,38,38); --teal: rgb(13,148,136); --ink: #1f2328; --muted: #656d76; --line: #d8dee4;
  --paper: #fff; --shade: #f6f8fa; --focus: #2563eb; --mono: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, Consolas, monospace; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: var(--ink); background: var(--shade); }
header.top { position: sticky; top: 0; z-index: 5; background: var(--paper); border-bottom: 1px solid var(--line); padding: 10px 20px; }
header.top h1 { font-size: 18px; margin: 0 12px 0 0; display: inline; }
.summary { color: var(--muted); font-size: 13px; }
.legend { margin-left: 18px; } .swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin: 0 4px -1px 8px; }
.swatch.pos { background: rgba(239,68,68,.8); } .swatch.neg { background: rgba(20,184,166,.8); }
.toolbar { display: flex; flex-wrap: wrap; gap: 14px; align-items: center; margin-top: 8px; font-size: 13px; }
.toolbar input[type=search] { width: 280px; padding: 5px 9px; border: 1px solid var(--line); border-radius: 6px; font: inherit; }
.toolbar select { font: inherit; padding: 3px; } .toolbar label { cursor: pointer; user-select: none; }
.toolbar button { font: inherit; border: 1px solid var(--line); background: var(--shade); border-radius: 6px; padding: 3px 10px; cursor: pointer; }
#status { color: var(--muted); margin-left: auto; }
.layout { display: grid; grid-template-columns: 250px minmax(0, 1fr); gap: 20px; padding: 16px 20px; align-items: start; }
nav.queries { position: sticky; top: 100px; max-height: calc(100vh - 120px); overflow: auto; font-size: 13px; }
nav.queries a { display: block; padding: 5px 8px; border-radius: 6px; color: var(--ink); text-decoration: none; border-left: 3px solid transparent; }
nav.queries a:hover { background: #eaeef2; } nav.queries a.active { background: #dbeafe; border-left-color: var(--focus); }
section.query { background: var(--paper); border: 1px solid var(--line); border-radius: 10px; padding: 16px 20px; margin-bottom: 20px; scroll-margin-top: 110px; }
section.query h2 { margin: 0 0 8px; font-size: 16px; display: flex; gap: 8px; align-items: center; }
.qid { font-family: var(--mono); }
.pc, .contrast { font-family: var(--mono); font-size: 14px; white-space: pre-wrap; word-break: break-word; display: grid; grid-template-columns: 90px 1fr; gap: 2px 10px; }
.label { color: var(--muted); font-family: system-ui, sans-serif; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; padding-top: 2px; }
.prompt { color: var(--ink); } .completion { background: #fef9c3; border-radius: 3px; padding: 0 4px; justify-self: start; }
.meta, .details { color: var(--muted); font-size: 13px; margin-top: 6px; display: flex; flex-wrap: wrap; gap: 4px 16px; }
.details { font-size: 12px; margin: 2px 0 4px; }
.badge { font-size: 11px; font-weight: 600; padding: 1px 7px; border-radius: 10px; text-transform: uppercase; letter-spacing: .03em; }
.badge.gen { background: #e0e7ff; color: #3730a3; } .badge.spur { background: #ffedd5; color: #9a3412; border: 1px solid #fdba74; }
.side h3 { font-size: 14px; margin: 16px 0 6px; } .side.positive h3 { color: var(--red); } .side.negative h3 { color: var(--teal); }
.count { font-weight: 400; color: var(--muted); font-size: 12px; } .count::before { content: "("; } .count::after { content: ")"; }
ol.hits { list-style: none; margin: 0; padding: 0; }
li.hit { border: 1px solid var(--line); border-left: 4px solid var(--red); border-radius: 8px; padding: 8px 12px; margin: 8px 0; background: var(--paper); outline: none; scroll-margin-top: 120px; }
li.hit.negative { border-left-color: var(--teal); }
li.hit.focused, section.query.focused { box-shadow: 0 0 0 3px var(--focus); }
li.empty { color: var(--muted); font-size: 13px; padding: 4px 0; }
.hit-head { display: flex; flex-wrap: wrap; gap: 4px 14px; align-items: baseline; font-size: 13px; }
.rank { font-weight: 700; font-family: var(--mono); } .score b, .delta b { font-family: var(--mono); font-weight: 600; }
.seq { color: var(--muted); font-family: var(--mono); } .prov { color: var(--muted); font-family: var(--mono); font-size: 12px; }
.hit-body { display: grid; grid-template-columns: minmax(0, 1fr) 250px; gap: 14px; margin-top: 6px; }
.tokens { font-family: var(--mono); font-size: 13px; line-height: 1.65; white-space: pre-wrap; word-break: break-word; max-height: 13em; overflow: auto; background: #fcfcfd; border: 1px solid #eef1f4; border-radius: 6px; padding: 6px 8px; }
li.hit.focused .tokens { max-height: 40em; }
.tok { border-radius: 2px; } .tok:hover { outline: 1px solid var(--ink); }
.layers { font-size: 11px; max-height: 13em; overflow: auto; }
.layer { display: grid; grid-template-columns: 110px 1fr; gap: 6px; align-items: center; height: 14px; }
.lname { font-family: var(--mono); color: var(--muted); overflow: hidden; text-overflow: ellipsis; white-space: nowrap; direction: rtl; text-align: left; }
.track { position: relative; height: 8px; background: #f1f3f5; border-radius: 2px; }
.track::after { content: ""; position: absolute; left: 50%; top: -2px; bottom: -2px; border-left: 1px solid #adb5bd; }
.bar { position: absolute; top: 0; bottom: 0; } .bar.pos { background: var(--red); } .bar.neg { background: var(--teal); }
body.hide-positive .side.positive, body.hide-negative .side.negative, li.hit.filtered { display: none; }
.empty { color: var(--muted); }
#help { display: none; position: fixed; inset: 0; background: rgba(15,23,42,.45); z-index: 10; align-items: center; justify-content: center; }
#help.open { display: flex; } #help > div { background: var(--paper); border-radius: 10px; padding: 18px 26px; min-width: 320px; box-shadow: 0 10px 30px rgba(0,0,0,.25); }
#help table { border-collapse: collapse; font-size: 14px; } #help td { padding: 3px 12px 3px 0; }
kbd { font-family: var(--mono); font-size: 12px; border: 1px solid var(--line); border-bottom-width: 2px; border-radius: 4px; padding: 0 5px; background: var(--shade); }
@media (max-width: 900px) { .layout { grid-template-columns: 1fr; } nav.queries { display: none; } .hit-body { grid-template-columns: 1fr; } }
"""

SCRIPT = """
(function () {
  "use strict";
  var body = document.body, $ = function (id) { return document.getElementById(id); };
  var filter = $("filter"), sortBy = $("sort"), help = $("help");
  var shows = { positive: $("show-positive"), negative: $("show-negative"), spurious: $("show-spurious") };
  var hits = Array.prototype.slice.call(document.querySelectorAll("li.hit"));
  var queries = Array.prototype.slice.call(document.querySelectorAll("section.query"));
  var links = Array.prototype.slice.call(document.querySelectorAll("nav.queries a"));
  hits.forEach(function (h) {
    h.searchText = (h.querySelector(".tokens").textContent + "\\n" + h.querySelector(".prov").textContent).toLowerCase();
  });
  function apply() {
    var needle = filter.value.trim().toLowerCase(), shown = 0;
    body.classList.toggle("hide-positive", !shows.positive.checked);
    body.classList.toggle("hide-negative", !shows.negative.checked);
    hits.forEach(function (h) {
      var hide = (needle !== "" && h.searchText.indexOf(needle) < 0) || (!shows.spurious.checked && h.dataset.spurious === "1");
      h.classList.toggle("filtered", hide);
    });
    document.querySelectorAll(".count").forEach(function (c) {
      var n = c.closest(".side").querySelectorAll("li.hit:not(.filtered)").length;
      c.textContent = n === +c.dataset.total ? String(n) : n + " of " + c.dataset.total;
    });
    hits.forEach(function (h) { if (visible(h)) { shown += 1; } });
    $("status").textContent = shown + " of " + hits.length + " sequences shown";
  }
  function sortHits() {
    var key = sortBy.value;
    var value = { score: function (h) { return -parseFloat(h.dataset.score); },
                  abs: function (h) { return -Math.abs(parseFloat(h.dataset.score)); },
                  rank: function (h) { return parseFloat(h.dataset.rank); } }[key];
    document.querySelectorAll("ol.hits").forEach(function (ol) {
      var items = Array.prototype.slice.call(ol.querySelectorAll("li.hit"));
      items.sort(function (a, b) { return value(a) - value(b); });
      items.forEach(function (li) { ol.appendChild(li); });
    });
  }
  function visible(el) { return el.getClientRects().length > 0; }
  var current = null;
  function focus(el, block) {
    if (!el) { return; }
    if (current) { current.classList.remove("focused"); }
    current = el; el.classList.add("focused"); el.focus({ preventScroll: true });
    el.scrollIntoView({ block: block || "nearest" });
    var query = el.closest("section.query");
    links.forEach(function (a) { a.classList.toggle("active", query !== null && a.dataset.target === query.id); });
  }
  function step(list, delta) {
    list = list.filter(visible);
    if (!list.length) { return; }
    var order = Array.prototype.slice.call(document.querySelectorAll("li.hit, section.query"));
    var at = current ? order.indexOf(current) : -1, pick = null;
    if (delta > 0) { pick = list.filter(function (el) { return order.indexOf(el) > at; })[0] || list[list.length - 1]; }
    else { var before = list.filter(function (el) { return order.indexOf(el) < at; }); pick = before[before.length - 1] || list[0]; }
    focus(pick, pick.tagName === "SECTION" ? "start" : "nearest");
  }
  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) { return; }
    if (e.target === filter) { if (e.key === "Escape" || e.key === "Enter") { filter.blur(); } return; }
    if (e.target.tagName === "SELECT" || e.target.tagName === "INPUT") { return; }
    var moves = { j: [hits, 1], ArrowDown: [hits, 1], k: [hits, -1], ArrowUp: [hits, -1],
                  n: [queries, 1], ArrowRight: [queries, 1], p: [queries, -1], ArrowLeft: [queries, -1] };
    if (moves[e.key]) { e.preventDefault(); step(moves[e.key][0], moves[e.key][1]); }
    else if (e.key === "/") { e.preventDefault(); filter.focus(); }
    else if (e.key === "?") { help.classList.toggle("open"); }
    else if (e.key === "Escape") { help.classList.remove("open"); }
  });
  filter.addEventListener("input", apply);
  Object.keys(shows).forEach(function (k) { shows[k].addEventListener("change", apply); });
  sortBy.addEventListener("change", sortHits);
  $("help-button").addEventListener("click", function () { help.classList.toggle("open"); });
  help.addEventListener("click", function () { help.classList.remove("open"); });
  hits.concat(queries).forEach(function (el) {
    el.addEventListener("click", function (e) { e.stopPropagation(); focus(el); });
  });
  links.forEach(function (a) {
    a.addEventListener("click", function (e) { e.preventDefault(); focus($(a.dataset.target), "start"); });
  });
  apply();
  body.dataset.ready = "1";
})();
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Influence report</title>
<style>{style}</style></head>
<body>
<header class="top"><h1>Influence report</h1><span class="summary">{summary}</span>
<div class="toolbar">
<input type="search" id="filter" placeholder="Filter sequences by text or document (/)" aria-label="filter">
<label>sort <select id="sort"><option value="rank">rank</option><option value="score">score</option>
<option value="abs">|score|</option></select></label>
<label><input type="checkbox" id="show-positive" checked> positive</label>
<label><input type="checkbox" id="show-negative" checked> negative</label>
<label><input type="checkbox" id="show-spurious" checked> spurious</label>
<button type="button" id="help-button" title="keyboard shortcuts (?)">?</button>
<span id="status"></span></div></header>
<div class="layout"><nav class="queries" aria-label="queries">{nav}</nav>
<main>{queries}</main></div>
<div id="help" role="dialog" aria-label="keyboard shortcuts"><div><h3>Keyboard</h3><table>
<tr><td><kbd>j</kbd> <kbd>↓</kbd> / <kbd>k</kbd> <kbd>↑</kbd></td><td>next / previous sequence</td></tr>
<tr><td><kbd>n</kbd> <kbd>→</kbd> / <kbd>p</kbd> <kbd>←</kbd></td><td>next / previous query</td></tr>
<tr><td><kbd>/</kbd></td><td>filter sequences</td></tr>
<tr><td><kbd>?</kbd></td><td>show / hide this help</td></tr>
<tr><td><kbd>Esc</kbd></td><td>close</td></tr></table>
<p class="empty">Tokens: red = raised log p of the completion, teal = lowered it; deeper = larger |influence|
within the sequence. Hover a token for its value.</p></div></div>
<script>{script}</script>
</body></html>
"""
