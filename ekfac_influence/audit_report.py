"""The self-influence stage's files: self_influence.f32, top.jsonl, manifest.json, self_influence.html.

    runs/<name>/self_influence/
      self_influence.f32    s(n) of every training sequence, float32 [N] (memory-map it)
      top.jsonl             the highest and lowest sequences ({"kind": "highest" | "lowest"}), then the
                            near-duplicate groups ({"kind": "duplicate_group"}), with text and provenance
      manifest.json         what was computed from what
      self_influence.html   the distribution (histogram of log10 s(n), inline SVG), the top sequences with
                            their tokens shaded by s_t(n), the near-duplicate groups; no script, no network

The page is the template `assets/self_influence.html.j2`, rendered with autoescaping (every string
from the data is escaped); its Content-Security-Policy allows no script and no fetch at all. Token
texts are pieces of the decoded sequence (`token_text`): they concatenate to its text exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from markupsafe import Markup

from .report_data import provenance_text
from .report_html import render_template, sci, shade
from .storage import staged_directory
from .token_text import token_pieces

VALUES_FILE, TOP_FILE, MANIFEST_FILE, PAGE_FILE = "self_influence.f32", "top.jsonl", "manifest.json", "self_influence.html"
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


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
    """The audit page from `assets/self_influence.html.j2` (autoescaped; no script at all)."""
    sides = [("highest", "Highest self-influence: outliers, rare or memorised text"),
             ("lowest", "Lowest self-influence: text the model finds typical")]
    facts = [("training sequences", len(values_N)), ("strategy", manifest.get("strategy")),
             ("median s(n)", sci(float(np.median(values_N)) if len(values_N) else float("nan"), sign=False)),
             ("near-duplicate cosine ≥", manifest.get("duplicate_threshold"))]
    if manifest.get("max_relative_error") is not None:
        facts.append(("tolerance ε", f"{manifest['tolerance']:g}: each s(n) is high by at most "
                                     f"{100 * manifest['max_relative_error']:.2g}% of itself"))
    return render_template("self_influence.html.j2", csp=Markup(CSP), style=Markup(_STYLE),
                           facts=[(label, str(value)) for label, value in facts if value is not None],
                           histogram=histogram(values_N),
                           sides=[(title, [_sequence_view(r) for r in records if r["kind"] == kind]) for kind, title in sides],
                           groups=[_group_view(r) for r in records if r["kind"] == "duplicate_group"])


def histogram(values_N: np.ndarray, bins: int = 40, width: int = 720, height: int = 180) -> dict | None:
    """Histogram of log10 s(n) as SVG bars (counts on a linear axis); None without a positive s(n)."""
    positive = np.asarray(values_N, dtype=np.float64)
    positive = positive[np.isfinite(positive) & (positive > 0)]
    if not len(positive):
        return None
    counts, edges = np.histogram(np.log10(positive), bins=bins)
    peak, bar = max(int(counts.max()), 1), width / bins
    rects = [{"x": f"{i * bar:.1f}", "y": f"{height - 20 - (height - 30) * c / peak:.1f}", "width": f"{bar - 1:.1f}",
              "height": f"{(height - 30) * c / peak:.1f}", "count": int(c), "low": f"{edges[i]:.2f}",
              "high": f"{edges[i + 1]:.2f}"} for i, c in enumerate(counts)]
    return {"width": width, "height": height, "rects": rects, "peak": peak, "low": f"{edges[0]:.2f}",
            "high": f"{edges[-1]:.2f}"}


def _sequence_view(record: dict) -> dict:
    """Tokens shaded by s_t(n) within the sequence (s(n) spans orders of magnitude across sequences)."""
    tokens, values = record.get("tokens"), record.get("per_token")
    view = {"rank": record["rank"], "value": sci(record["self_influence"], sign=False), "sequence": record["sequence"],
            "provenance": provenance_text(record["provenance"]), "group": record.get("group"),
            "text": record.get("text", ""), "tokens": None}
    if tokens and values:
        peak = max((abs(v) for v in values), default=0.0)
        view["tokens"] = [{"text": token, "style": shade(value, peak), "value": sci(value)}
                          for token, value in zip(tokens, values)]
    return view


def _group_view(group: dict) -> dict:
    return {"group": group["group"], "size": group["size"], "min_cosine": f"{group['min_cosine']:.3f}",
            "members": [{"sequence": m["sequence"], "value": sci(m["self_influence"], sign=False),
                         "provenance": provenance_text(m["provenance"]), "text": " ".join(m["text"].split())[:200]}
                        for m in group["sequences"]]}


_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:60em;color:#1f2937}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}h3{font-size:1em}.note,.empty{color:#6b7280}
.hist rect{fill:#6366f1}.hist text{font-size:11px;fill:#374151}li{margin:.6em 0}
.head{font-size:.9em;color:#374151}.doc{font-family:ui-monospace,monospace}
.tokens,.text{font-family:ui-monospace,monospace;white-space:pre-wrap;background:#f9fafb;padding:.3em;border-radius:4px}
.tok:empty{display:inline-block;width:2px;margin-right:-2px;height:1.1em;vertical-align:text-bottom}
.badge{background:#fde68a;border-radius:3px;padding:0 .3em}.group{border-left:3px solid #fbbf24;padding-left:.8em}"""
