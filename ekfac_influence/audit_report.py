"""The self-influence stage's files: self_influence.f32, top.jsonl, manifest.json, self_influence.html.

    runs/<name>/self_influence/
      self_influence.f32    s(n) of every training sequence, float32 [N] (memory-map it)
      top.jsonl             the highest and lowest sequences ({"kind": "highest" | "lowest"}), then the
                            near-duplicate groups ({"kind": "duplicate_group"}), with text and provenance
      manifest.json         what was computed from what
      self_influence.html   the distribution (histogram of log10 s(n), inline SVG), the top sequences with
                            their tokens shaded by s_t(n), the near-duplicate groups and the source documents,
                            linked within the page; no script, no network

The page is the template `assets/self_influence.html.j2`, rendered with autoescaping (every string
from the data is escaped); its Content-Security-Policy allows no script and no fetch at all. Token
texts are pieces of the decoded sequence (`token_text`): they concatenate to its text exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from markupsafe import Markup

from .report_data import doc_id, provenance_text
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


COSINE_SAMPLE = 1000
"""A group's lowest sketched cosine is taken over the pairs of its first this many sequences (all, in a smaller one)."""


def group_record(index: int, members: list[int], values_N: np.ndarray, min_cosine: float, joint: float, corpus,
                 tokenizer) -> dict:
    """A near-duplicate group: its sequences (highest self-influence first) with text and provenance; `min_cosine`
    is the lowest sketched cosine between its first `min_cosine_over` sequences (in the search's order); `joint` is
    s(G), the self-influence of the group as one (`similarity.joint_self_influence`), and `joint_over_sum` is s(G)
    over the sum of its members' s(n): about 1 for unrelated sequences, up to the group's size for copies."""
    over = min(len(members), COSINE_SAMPLE)
    members = sorted(members, key=lambda n: -values_N[n])
    total = float(values_N[members].sum())
    return {"kind": "duplicate_group", "group": index, "size": len(members), "min_cosine": min_cosine,
            "min_cosine_over": over, "joint_self_influence": joint,
            "joint_over_sum": joint / total if total > 0 else None,
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
    """The audit page from `assets/self_influence.html.j2` (autoescaped; no script at all).

    Linked within the page: each sequence's source documents (`#doc-k`, a section listing the sequences shown from
    each document, linked back), its near-duplicate group (`#group-g`), and a group's members that are shown among
    the highest or lowest (`#seq-n`, on their first appearance).
    """
    sides = [("highest", "Highest self-influence: outliers, rare or memorised text"),
             ("lowest", "Lowest self-influence: text the model finds typical")]
    facts = [("training sequences", len(values_N)), ("strategy", manifest.get("strategy")),
             ("median s(n)", sci(float(np.median(values_N)) if len(values_N) else float("nan"), sign=False)),
             ("near-duplicate cosine ≥", manifest.get("duplicate_threshold"))]
    if manifest.get("max_relative_error") is not None:
        facts.append(("tolerance ε", f"{manifest['tolerance']:g}: each s(n) is high by at most "
                                     f"{100 * manifest['max_relative_error']:.2g}% of itself"))
    links = _Links()
    shown = [(title, [_sequence_view(r, links) for r in records if r["kind"] == kind]) for kind, title in sides]
    groups = [_group_view(r, links) for r in records if r["kind"] == "duplicate_group"]
    return render_template("self_influence.html.j2", csp=Markup(CSP), style=Markup(_STYLE),
                           facts=[(label, str(value)) for label, value in facts if value is not None],
                           histogram=histogram(values_N), sides=shown, groups=groups, documents=links.documents())


class _Links:
    """The page's anchors: a sequence's first appearance (`seq-n`), a group (`group-g`) and each source document
    (`doc-k`, numbered in order of first mention: a document's name can hold any character), with the sequences
    shown from it."""

    def __init__(self):
        self.anchored: set[int] = set()
        self._documents: dict[tuple, dict] = {}  # (name, row) -> {"anchor", "name", "sequences"}
        self._listed: set[tuple[str, int]] = set()  # (document anchor, sequence) already in its document's list

    def sequence(self, n: int) -> str | None:
        """`seq-n` on the sequence's first appearance in the highest or lowest, None after."""
        if n in self.anchored:
            return None
        self.anchored.add(n)
        return f"seq-{n}"

    def target(self, n: int, group: int | None) -> str | None:
        """Where a mention of sequence n leads: its record if shown, else its group."""
        return f"seq-{n}" if n in self.anchored else (None if group is None else f"group-{group}")

    def provenance(self, provenance: list, n: int, value: str, group: int | None = None) -> list[dict]:
        """Each source piece's text (`doc:row[c0:c1]`) and its document's anchor; n joins the document's list."""
        pieces = []
        for piece in provenance or []:
            row = piece.get("row") if isinstance(piece, dict) else None
            name = doc_id(piece)
            document = self._documents.setdefault((name, row), {
                "anchor": f"doc-{len(self._documents)}", "name": name + ("" if row is None else f":{row}"),
                "sequences": []})
            text = provenance_text([piece])
            if (document["anchor"], n) not in self._listed:
                self._listed.add((document["anchor"], n))
                document["sequences"].append({"sequence": n, "value": value, "target": self.target(n, group),
                                              "span": text[len(document["name"]):]})  # [c0:c1] or ""
            pieces.append({"text": text, "anchor": document["anchor"]})
        return pieces

    def documents(self) -> list[dict]:
        return list(self._documents.values())


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


def _sequence_view(record: dict, links: _Links) -> dict:
    """Tokens shaded by s_t(n) within the sequence (s(n) spans orders of magnitude across sequences)."""
    tokens, values = record.get("tokens"), record.get("per_token")
    n, value = record["sequence"], sci(record["self_influence"], sign=False)
    anchor = links.sequence(n)  # before its documents list it, so that they link to it
    view = {"rank": record["rank"], "value": value, "sequence": n, "anchor": anchor,
            "provenance": links.provenance(record["provenance"], n, value), "group": record.get("group"),
            "text": record.get("text", ""), "tokens": None}
    if tokens and values:
        peak = max((abs(v) for v in values), default=0.0)
        view["tokens"] = [{"text": token, "style": shade(value, peak), "value": sci(value)}
                          for token, value in zip(tokens, values)]
    return view


def _group_view(group: dict, links: _Links) -> dict:
    """A group's members, each linked to its record where the highest or lowest show it, and to its documents."""
    members = []
    for member in group["sequences"]:
        n, value = member["sequence"], sci(member["self_influence"], sign=False)
        members.append({"sequence": n, "value": value, "target": links.target(n, None),
                        "provenance": links.provenance(member["provenance"], n, value, group["group"]),
                        "text": " ".join(member["text"].split())[:200]})
    over = group.get("min_cosine_over", group["size"])
    cosines = ("every pairwise sketched cosine" if over >= group["size"] else
               f"every pairwise sketched cosine among its first {over:,} sequences")
    joint = None
    if group.get("joint_self_influence") is not None:
        ratio = group.get("joint_over_sum")
        joint = {"value": sci(group["joint_self_influence"], sign=False),
                 "ratio": "n/a" if ratio is None else f"{ratio:.3g}"}
    return {"group": group["group"], "size": group["size"], "min_cosine": f"{group['min_cosine']:.3f}", "cosines": cosines,
            "joint": joint, "members": members}


_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:60em;color:#1f2937}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}h3{font-size:1em}.note,.empty{color:#6b7280}
.hist rect{fill:#6366f1}.hist text{font-size:11px;fill:#374151}li{margin:.6em 0}
.head{font-size:.9em;color:#374151}.doc{font-family:ui-monospace,monospace}
.tokens,.text{font-family:ui-monospace,monospace;white-space:pre-wrap;background:#f9fafb;padding:.3em;border-radius:4px}
.tok:empty{display:inline-block;width:2px;margin-right:-2px;height:1.1em;vertical-align:text-bottom}
.badge{background:#fde68a;border-radius:3px;padding:0 .3em}.group{border-left:3px solid #fbbf24;padding-left:.8em}
.source{border-left:3px solid #c7d2fe;padding-left:.8em}a{color:inherit;text-decoration-style:dotted}
:target{background:#fef3c7}"""
