"""The review page: one self-contained HTML file per query set.

Each token t of a sequence is shaded by its influence a_t, red for a_t > 0 and teal for a_t < 0
(Grosse et al., 2023), with alpha ∝ |a_t| / max_t |a_t| within that sequence. Every string that
comes from data (training text, tokens, prompts, document ids) goes through `html.escape`; the page
loads nothing from the network, and a Content-Security-Policy allows only its own script (by hash),
so an injected `<script>` or `onerror=` would not run even if escaping failed. The page's frame,
style and script are the files in `assets/`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from html import escape
from importlib import resources

from .report_data import HIT_KEYS, QUERY_KEYS, ROW_FIELDS, SIDES, extras, provenance_text

RED, TEAL = (239, 68, 68), (20, 184, 166)  # positive, negative: the paper's colours
MAX_ALPHA = 0.85  # a fully shaded token must still be readable


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


STYLE, SCRIPT, PAGE = _asset("report.css"), _asset("report.js"), _asset("report.html")


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
    unknown = extras(mapping, known | set(ROW_FIELDS))
    if not unknown:
        return ""
    parts = [f"<span>{escape(str(k))}: <b>{escape(', '.join(map(str, v)) if isinstance(v, list) else str(v))}</b></span>"
             for k, v in unknown.items()]
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
