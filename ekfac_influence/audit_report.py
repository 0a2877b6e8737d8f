"""The self-influence stage's files: self_influence.f32, top.jsonl, manifest.json, self_influence.html.

    runs/<name>/self_influence/
      self_influence.f32    s(n) of every training sequence, float32 [N] (memory-map it)
      top.jsonl             the highest and lowest sequences ({"kind": "highest" | "lowest"}), then the
                            near-duplicate groups ({"kind": "duplicate_group"}), with text and provenance
      manifest.json         what was computed from what
      self_influence.html   the distribution (histogram of log10 s(n), inline SVG), the top sequences with
                            their tokens shaded by s_t(n), the near-duplicate groups; no script, no network

Every string from the data goes through `html.escape`; the page's Content-Security-Policy allows no
script and no fetch at all.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

import numpy as np

from .report_data import provenance_text
from .storage import staged_directory
from .token_text import token_pieces

VALUES_FILE, TOP_FILE, MANIFEST_FILE, PAGE_FILE = "self_influence.f32", "top.jsonl", "manifest.json", "self_influence.html"
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
RED, TEAL = (239, 68, 68), (20, 184, 166)


def sequence_record(kind: str, rank: int, n: int, value: float, corpus, tokenizer, *, per_layer: dict | None = None,
                    per_token: list[float] | None = None, group: int | None = None) -> dict:
    """One audited sequence: its self-influence, splits, text, tokens and source documents."""
    tokens, text = token_pieces(tokenizer, [int(t) for t in corpus.tokens_NT[n, : int(corpus.lengths_N[n])]])
    return {"kind": kind, "rank": rank, "sequence": n, "self_influence": value, "per_layer": per_layer or {},
            "per_token": per_token, "group": group, "tokens": tokens, "text": text, "provenance": corpus.provenance[n]}


def group_record(index: int, members: list[int], values_N: np.ndarray, min_cosine: float, corpus, tokenizer) -> dict:
    """A near-duplicate group: its sequences (highest self-influence first) with text and provenance."""
    members = sorted(members, key=lambda n: -values_N[n])
    return {"kind": "duplicate_group", "group": index, "size": len(members), "min_cosine": min_cosine,
            "sequences": [{"sequence": n, "self_influence": float(values_N[n]), "provenance": corpus.provenance[n],
                           "text": tokenizer.decode([int(t) for t in corpus.tokens_NT[n, : int(corpus.lengths_N[n])]])}
                          for n in members]}


def write_audit(out, values_N: np.ndarray, records: list[dict], manifest: dict, *, overwrite: bool) -> Path:
    """Every file into a staged directory, renamed into place at the end (readers see all or nothing)."""
    with staged_directory(out, overwrite=overwrite) as tmp:
        np.asarray(values_N, dtype=np.float32).tofile(tmp / VALUES_FILE)
        (tmp / TOP_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        manifest = dict(manifest, values={"file": VALUES_FILE, "dtype": "float32", "shape": [len(values_N)],
                                          "meaning": "s(n) = ∇log p(z_n)ᵀ (G + λI)⁻¹ ∇log p(z_n), in log-probability units"})
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        (tmp / PAGE_FILE).write_text(render_page(values_N, records, manifest), encoding="utf-8")
    return Path(out)


# ----------------------------------------------------------------------------- the page


def render_page(values_N: np.ndarray, records: list[dict], manifest: dict) -> str:
    sides = [("highest", "Highest self-influence: outliers, rare or memorised text"),
             ("lowest", "Lowest self-influence: text the model finds typical")]
    sections = "".join(f"<h2>{escape(title)}</h2><ol>{''.join(_sequence_html(r) for r in records if r['kind'] == kind)}</ol>"
                       for kind, title in sides)
    groups = [r for r in records if r["kind"] == "duplicate_group"]
    group_html = "".join(_group_html(g) for g in groups) or '<p class="empty">No near-duplicate group.</p>'
    facts = [("training sequences", len(values_N)), ("strategy", manifest.get("strategy")),
             ("median s(n)", _sci(float(np.median(values_N)) if len(values_N) else float("nan"))),
             ("near-duplicate cosine ≥", manifest.get("duplicate_threshold"))]
    summary = " · ".join(f"<span>{escape(str(k))} <b>{escape(str(v))}</b></span>" for k, v in facts if v is not None)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{escape(CSP, quote=False)}"><title>Self-influence audit</title>'
            f'<style>{_STYLE}</style></head><body><h1>Self-influence audit</h1><p>{summary}</p>'
            f'<p class="note">s(n) = ∇log p(z_n)ᵀ (G + λI)⁻¹ ∇log p(z_n): how much training on sequence n raises its own '
            f'log-likelihood. Tokens are shaded by their share s_t(n) (red &gt; 0, teal &lt; 0).</p>'
            f'{histogram_svg(values_N)}{sections}<h2>Near-duplicate groups '
            f'(cosine of P<sup>1/2</sup>-whitened gradients)</h2>{group_html}</body></html>')


def histogram_svg(values_N: np.ndarray, bins: int = 40, width: int = 720, height: int = 180) -> str:
    """Histogram of log10 s(n) as inline SVG bars (counts on a linear axis)."""
    positive = np.asarray(values_N, dtype=np.float64)
    positive = positive[np.isfinite(positive) & (positive > 0)]
    if not len(positive):
        return '<p class="empty">No positive self-influence to draw.</p>'
    logs = np.log10(positive)
    counts, edges = np.histogram(logs, bins=bins)
    peak, bar = max(int(counts.max()), 1), width / bins
    rects = "".join(f'<rect x="{i * bar:.1f}" y="{height - 20 - (height - 30) * c / peak:.1f}" width="{bar - 1:.1f}" '
                    f'height="{(height - 30) * c / peak:.1f}"><title>{int(c)} sequences with log10 s in '
                    f'[{edges[i]:.2f}, {edges[i + 1]:.2f})</title></rect>' for i, c in enumerate(counts))
    axis = (f'<text x="0" y="{height - 4}">10^{edges[0]:.2f}</text>'
            f'<text x="{width}" y="{height - 4}" text-anchor="end">10^{edges[-1]:.2f}</text>'
            f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle">s(n), log scale; tallest bar {peak} sequences</text>')
    return (f'<svg class="hist" role="img" aria-label="histogram of self-influence" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{rects}{axis}</svg>')


def _sci(value: float) -> str:
    return "n/a" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:.3e}"


def _sequence_html(record: dict) -> str:
    group = record.get("group")
    badge = f' <span class="badge">near-duplicate group {escape(str(group))}</span>' if group is not None else ""
    return (f'<li><div class="head"><b>#{escape(str(record["rank"]))}</b> s(n) <b>{escape(_sci(record["self_influence"]))}'
            f'</b> · seq {escape(str(record["sequence"]))} · <span class="doc">{escape(provenance_text(record["provenance"]))}'
            f'</span>{badge}</div><div class="tokens">{_tokens_html(record)}</div></li>')


def _group_html(group: dict) -> str:
    items = "".join(f'<li>seq {escape(str(m["sequence"]))} · s(n) {escape(_sci(m["self_influence"]))} · '
                    f'<span class="doc">{escape(provenance_text(m["provenance"]))}</span><div class="text">'
                    f'{escape(" ".join(m["text"].split())[:200])}</div></li>' for m in group["sequences"])
    lowest = group["min_cosine"]
    return (f'<div class="group"><h3>Group {escape(str(group["group"]))}: {escape(str(group["size"]))} sequences, '
            f'every pairwise cosine ≥ {lowest:.3f}</h3><ul>{items}</ul></div>')


def _tokens_html(record: dict) -> str:
    """Token spans shaded by s_t(n): red above 0, teal below, alpha ∝ |s_t| / max_t |s_t|."""
    tokens, values = record.get("tokens"), record.get("per_token")
    if not tokens or not values:
        return escape(record.get("text", ""))
    peak = max((abs(v) for v in values), default=0.0) or 1.0
    spans = []
    for token, value in zip(tokens, values):
        r, g, b = RED if value > 0 else TEAL
        alpha = round(0.85 * abs(value) / peak, 3)
        style = f' style="background:rgba({r},{g},{b},{alpha})"' if alpha >= 0.01 else ""
        spans.append(f'<span class="tok"{style} title="{value:+.3e}">{escape(token)}</span>')
    return "".join(spans)


_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:60em;color:#1f2937}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}h3{font-size:1em}.note,.empty{color:#6b7280}
.hist rect{fill:#6366f1}.hist text{font-size:11px;fill:#374151}li{margin:.6em 0}
.head{font-size:.9em;color:#374151}.doc{font-family:ui-monospace,monospace}
.tokens,.text{font-family:ui-monospace,monospace;white-space:pre-wrap;background:#f9fafb;padding:.3em;border-radius:4px}
.badge{background:#fde68a;border-radius:3px;padding:0 .3em}.group{border-left:3px solid #fbbf24;padding-left:.8em}"""
