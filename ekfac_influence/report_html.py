"""The review page: one self-contained HTML file per query set, rendered by Jinja2 with autoescaping.

This module turns the records into plain values (numbers formatted, colours computed); the markup is
the template `assets/report.html.j2`, its style and script `assets/report.{css,js}`. Autoescaping
escapes every string that comes from data (training text, tokens, prompts, document ids); only the
page's own style and script are inserted as they are. The page loads nothing from the network, and a
Content-Security-Policy allows only its own script (by hash), so an injected `<script>` or
`onerror=` would not run even if escaping failed.

**One scale per query.** Each token t of a hit is shaded by its influence a_t, red for a_t > 0 and
teal for a_t < 0 (Grosse et al., 2023), with alpha = 0.85 |a_t| / A_q, where A_q = max |a_t| over
every token of every hit of query q; a colour bar under the query maps the shades to values. The
layer bars share one scale per query too: full width = L_q = max |score_ℓ| over the query's hits.
So two sequences of one query can be compared by eye; values are in the tooltips.

**Standing among the candidates.** A hit of rank r on the positive side is the r-th highest of the C
candidates scored, "top 100 r / C %"; on the negative side the r-th lowest, "bottom 100 r / C %".

**Δlog p** = score / N, N the training sequences (design §1): the first-order change of
log p(completion) from adding one copy of the sequence to the N. It is a slope: beyond |Δlog p| ≈ 1
the linear estimate is outside the range where it holds, and the page says so beside it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from importlib import resources

import jinja2
from markupsafe import Markup

from .report_data import HIT_KEYS, QUERY_KEYS, ROW_FIELDS, SIDES, extras, provenance_text

RED, TEAL = (239, 68, 68), (20, 184, 166)  # positive, negative: the paper's colours
MAX_ALPHA = 0.85  # a fully shaded token must still be readable
LINEAR_RANGE = 1.0  # |Δlog p| (nats) beyond which a first-order estimate is not a prediction
SIDE_TITLES = {"positive": "Most helpful sequences (positive influence)",
               "negative": "Most harmful sequences (negative influence)"}


def asset(name: str) -> str:
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


STYLE, SCRIPT = asset("report.css"), asset("report.js")
TEMPLATES = jinja2.Environment(loader=jinja2.FunctionLoader(asset), autoescape=True, undefined=jinja2.StrictUndefined,
                               trim_blocks=True, lstrip_blocks=True)


def render_template(name: str, **context) -> str:
    """An `assets/` template rendered with autoescaping (wrap trusted markup in `Markup`)."""
    return TEMPLATES.get_template(name).render(**context)


def render_html(records: list[dict], manifest: dict) -> str:
    """One self-contained page: inline style and script only, every data string escaped.

    `manifest` is the query set's manifest; its optional "model" (the model's name or path, which
    `report_data.read_model` finds in the run) is shown beside the fingerprint.
    """
    layer_order = [str(name) for name in manifest.get("layers") or []]
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; "
           "base-uri 'none'; form-action 'none'")
    num_train = manifest.get("num_train_sequences")
    assert '"' not in csp  # the policy is ours, not data: inserted as it is, so the file reads as the browser does
    return render_template("report.html.j2", csp=Markup(csp), style=Markup(STYLE),
                           script=Markup(SCRIPT), summary=summary_items(manifest, records),
                           queries=[query_view(i, record, layer_order, num_train) for i, record in enumerate(records)],
                           red=RED, teal=TEAL, max_alpha=MAX_ALPHA)


# ----------------------------------------------------------------------------- formatting


def sci(value, sign: bool = True) -> str:
    if not _is_number(value) or not math.isfinite(value):
        return "n/a"
    return f"{value:+.3e}" if sign else f"{value:.3e}"


def shade(value: float, peak: float) -> str:
    """The token's background: red or teal, alpha = MAX_ALPHA |value| / peak ("" when too faint)."""
    alpha = round(MAX_ALPHA * abs(value) / peak, 3) if peak > 0 else 0.0
    r, g, b = RED if value > 0 else TEAL
    return f"background:rgba({r},{g},{b},{alpha})" if alpha >= 0.01 else ""


def percent(fraction: float) -> str:
    p = 100 * fraction
    return f"{p:.0f}%" if p >= 10 else f"{p:.1f}%" if p >= 1 else f"{p:.2g}%"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> float:
    return float(value) if _is_number(value) and math.isfinite(value) else 0.0


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _plain(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


# ----------------------------------------------------------------------------- view values


def summary_items(manifest: dict, records: list[dict]) -> list[tuple[str, str, str]]:
    """(label, value, tooltip) of the page's header; the model by name or path, then its fingerprint."""
    fingerprint, model = manifest.get("fingerprint"), manifest.get("model")
    layers = manifest.get("layers")
    items = [("model", model, "the model's name or path, as the run's config gives it"),
             ("fingerprint", str(fingerprint)[:12] if fingerprint else None,
              f"fingerprint of the tracked weights: {fingerprint}"),
             ("strategy", manifest.get("strategy"), "the curvature approximation"), ("queries", len(records), ""),
             ("training sequences", manifest.get("num_train_sequences"), "N, the divisor of Δlog p"),
             ("tracked layers", len(layers) if isinstance(layers, list) else None, "")]
    return [(label, str(value), title) for label, value, title in items if value is not None]


RANKINGS = {"relatif": "RelatIF, score / √s(n)", "cosine": "cosine, score / (‖P^{1/2}∇f‖ · ‖P^{1/2}∇log p(z_n)‖)"}
"""query.normalize's rankings as the page names them (s(n): the sequence's self-influence)."""


def ranking_of(record: dict) -> str | None:
    """The normalisation that ranks this query's sequences (the record's `ranking`, e.g. "relatif (…)"); None: raw."""
    ranking = record.get("ranking")
    kind = ranking.split()[0] if isinstance(ranking, str) and ranking.strip() else None
    return None if kind in (None, "none") else kind


def ranked_by(record: dict, kind: str | None) -> str:
    """What orders the query's sequences, and among which candidates the normalised score was computed."""
    if kind is None:
        return "ranked by the raw score"
    pool = re.search(r"rescored: ([^)]*)\)", str(record.get("ranking")))
    among = f", among {pool.group(1)}" if pool else ""
    return f"ranked by {RANKINGS.get(kind, kind)}{among}; the raw score is shown beside it"


def query_view(i: int, record: dict, layer_order: list[str], num_train) -> dict:
    hits = [hit for _, key in SIDES for hit in record.get(key, [])]
    kind = ranking_of(record)
    token_peak = max((abs(_finite(v)) for hit in hits for v in _token_values(hit)), default=0.0)
    layer_peak = max((abs(_finite(v)) for hit in hits for v in (hit.get("per_layer") or {}).values()), default=0.0)
    contrast, logp = record.get("contrast"), record.get("logp")
    candidates = record.get("num_candidates")
    return {"anchor": f"q-{i}", "label": query_label(i, record), "nav": _clip(record["prompt"] + record["completion"], 60),
            "generated": bool(record.get("generated")), "prompt": record["prompt"], "completion": record["completion"],
            "contrast": contrast if isinstance(contrast, str) else None,
            "measured": "log p(completion) − log p(contrast)" if isinstance(contrast, str) else "log p(completion | prompt)",
            "logp": f"{logp:.4g}" if _is_number(logp) else None, "prompt_tokens": record.get("prompt_tokens"),
            "completion_tokens": record.get("completion_tokens", "?"), "num_candidates": candidates,
            "num_train": num_train, "details": _details(record, QUERY_KEYS | {"ranking"}),
            "ranking": kind, "ranked_by": ranked_by(record, kind),
            "token_scale": colour_scale(token_peak), "layer_scale": sci(layer_peak, sign=False) if layer_peak else None,
            "sides": [{"side": side, "title": SIDE_TITLES[side],
                       "hits": [hit_view(side, hit, layer_order, token_peak, layer_peak, candidates, num_train,
                                         ranked=kind is not None)
                                for hit in record.get(key, [])]} for side, key in SIDES]}


def query_label(i: int, record: dict) -> str:
    return str(record.get("id") if record.get("id") is not None else f"q{record.get('query', i)}")


def colour_scale(peak: float) -> dict | None:
    """The colour bar of a query: ticks at −A, −A/2, 0, A/2, A, the gradient's ends at full alpha."""
    if peak <= 0:
        return None
    return {"peak": sci(peak, sign=False), "ticks": [sci(peak * f) if f else "0" for f in (-1, -0.5, 0, 0.5, 1)],
            "gradient": (f"linear-gradient(to right, rgba({TEAL[0]},{TEAL[1]},{TEAL[2]},{MAX_ALPHA}), "
                         f"rgba({TEAL[0]},{TEAL[1]},{TEAL[2]},0) 50%, rgba({RED[0]},{RED[1]},{RED[2]},0) 50%, "
                         f"rgba({RED[0]},{RED[1]},{RED[2]},{MAX_ALPHA}))")}


def hit_view(side: str, hit: dict, layer_order: list[str], token_peak: float, layer_peak: float, candidates,
             num_train, *, ranked: bool = False) -> dict:
    """ranked: a normalised score ranks the query's sequences; it heads the sequence beside the raw score, and the
    standing among the candidates is not shown (the rank is within the rescored pool, not among every candidate)."""
    score, rank, delta = hit["score"], hit.get("rank"), hit.get("delta_logp")
    normalized = hit.get("normalized_score") if ranked else None
    return {"side": side, "rank": rank, "score": float(score), "score_text": sci(score), "delta": sci(delta),
            "delta_beyond": _is_number(delta) and abs(delta) > LINEAR_RANGE, "sequence": hit.get("sequence"),
            "spurious": bool(hit.get("spurious")), "standing": None if ranked else standing(side, rank, candidates),
            "normalized": sci(normalized) if _is_number(normalized) else None,
            "provenance": [_provenance(piece) for piece in hit.get("provenance") or []],
            "details": _details(hit, HIT_KEYS | ({"normalized_score"} if normalized is not None else set())),
            "text": str(hit.get("text", "")),
            "tokens": token_views(hit, token_peak), "layers": layer_views(hit.get("per_layer") or {}, layer_order, layer_peak)}


def standing(side: str, rank, candidates) -> dict | None:
    """Rank r among C candidates: top (positive) or bottom (negative) 100 r / C percent."""
    if not _is_number(rank) or not _is_number(candidates) or candidates <= 0:
        return None
    where = "top" if side == "positive" else "bottom"
    order = "highest" if side == "positive" else "lowest"
    fraction = min(rank / candidates, 1.0)
    return {"text": f"{where} {percent(fraction)}", "fraction": fraction,
            "title": f"#{rank} {order} score of the {candidates} candidates scored"}


def _token_values(hit: dict) -> list:
    values = hit.get("per_token")
    return values if isinstance(values, list) and isinstance(hit.get("tokens"), list) else []


def token_views(hit: dict, peak: float) -> list[dict] | None:
    """(text, background, value) per token, shaded on the query's scale; None without tokens."""
    tokens, values = hit.get("tokens"), _token_values(hit)
    if not isinstance(tokens, list) or not tokens:
        return None
    values = [_finite(v) for v in values] + [0.0] * max(0, len(tokens) - len(values))
    return [{"text": str(token), "style": shade(value, peak), "value": sci(value)} for token, value in zip(tokens, values)]


def layer_views(per_layer: dict, layer_order: list[str], peak: float) -> list[dict]:
    """A diverging bar per layer (red right, teal left), full width = the query's largest |layer term|."""
    names = [n for n in layer_order if n in per_layer] + [n for n in per_layer if n not in layer_order]
    values = {n: float(per_layer[n]) for n in names if _is_number(per_layer[n])}
    prefix = _common_prefix(list(values))
    return [{"name": name, "label": name[len(prefix):] or name, "value": sci(value), "positive": value >= 0,
             "position": "left:50%" if value >= 0 else "right:50%",
             "width": round(50 * abs(value) / peak, 2) if peak > 0 and math.isfinite(value) else 0}
            for name, value in values.items()]


def _details(mapping: dict, known: set) -> list[tuple[str, str]]:
    return [(str(k), _plain(v)) for k, v in extras(mapping, known | set(ROW_FIELDS)).items()]


def _provenance(piece) -> tuple[str, str]:
    if not isinstance(piece, dict):
        return str(piece), ""
    return provenance_text([piece]), json.dumps(piece, ensure_ascii=False)


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
