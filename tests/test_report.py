"""The review report: flat JSONL/CSV rows, and an HTML page that is self-contained, escapes all data,
and works in a real browser (headless Chromium: `apt-get install -y --no-install-recommends chromium`)."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from markupsafe import escape

from conftest import bpe_tokenizer
from ekfac_influence.report import ReportError, export_report, render_html
from ekfac_influence.report_data import read_model
from ekfac_influence.token_text import token_pieces

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
LAYERS = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]
SCRIPT_PAYLOAD = "<script>window.__pwned = 1; document.documentElement.dataset.pwned = 'script'</script>"
IMG_PAYLOAD = '<img src=x onerror="window.__pwned=2; document.documentElement.dataset.pwned=\'img\'">'
DOC_PAYLOAD = '"><script>window.__pwned = 3; document.documentElement.dataset.pwned = "doc"</script>'
UNICODE_TEXT = "Ünïcode ☃ — naïve café, 東京 ∑ 𝜆"
CJK_TEXT = "東京と京都 🎉👍🏽 naïve café — Ünïcode"  # split across byte-level tokens: � when decoded one by one


def hit(rank, sequence, score, tokens, per_token, *, doc="wiki", spurious=False, **extra):
    return {"rank": rank, "sequence": sequence, "score": score, "delta_logp": score / 1000, "spurious": spurious,
            "per_layer": {LAYERS[0]: score * 0.5, LAYERS[1]: -score * 0.25, LAYERS[2]: score * 0.75},
            "per_token": per_token, "tokens": tokens, "text": "".join(tokens),
            "provenance": [{"doc": doc, "row": sequence, "token_span": [0, len(tokens)], "char_span": [10, 60]},
                           {"doc": "books", "row": 7, "token_span": [len(tokens), 64], "char_span": [0, 5]}],
            **extra}


def cjk_hit(rank: int, sequence: int, score: float) -> dict:
    """A sequence of non-ASCII text with its tokens as the query stage writes them (token_text)."""
    tokenizer = bpe_tokenizer()
    pieces, text = token_pieces(tokenizer, tokenizer(CJK_TEXT)["input_ids"])
    assert text == CJK_TEXT and "".join(pieces) == text
    return {**hit(rank, sequence, score, pieces, [score / len(pieces)] * len(pieces)), "text": text}


def records() -> list[dict]:
    """Two queries: a plain one whose completion the model generated, and a contrastive one."""
    q0 = {"query": 0, "id": "q0", "prompt": "The capital of France is", "completion": " Paris", "contrast": None,
          "generated": True, "logp": -1.25, "prompt_tokens": 5, "completion_tokens": 1, "num_candidates": 1000,
          "expected_topics": ["geography", "france"],
          "top_positive": [hit(1, 371, 8389.6, ["Paris", " is", " the", " capital"], [0.5, -0.25, 0.0, 2.0], topic="geo"),
                           hit(2, 12, 120.0, [SCRIPT_PAYLOAD, " and ", IMG_PAYLOAD], [1.0, 0.1, -0.5], doc=DOC_PAYLOAD),
                           hit(3, 99, 3.5, ["spike", " here"], [3.5, 0.0], spurious=True)],
          "top_negative": [hit(1, 5, -42.0, ["Lyon", " is", " big"], [-1.0, 0.5, -3.0]),
                           hit(2, 6, -7.0, ["Rome"], [-7.0])]}
    q1 = {"query": 1, "id": "q1", "prompt": UNICODE_TEXT, "completion": " yes", "contrast": " no", "generated": False,
          "logp": 0.5, "prompt_tokens": 9, "completion_tokens": 1, "num_candidates": 20,
          "top_positive": [hit(1, 40, 9.0, ["café", " ☃"], [1.0, 2.0])], "top_negative": [cjk_hit(1, 41, -0.5)]}
    return [q0, q1]


@pytest.fixture
def query_dir(tmp_path) -> Path:
    path = tmp_path / "queries" / "demo"
    path.mkdir(parents=True)
    (path / "topk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()), encoding="utf-8")
    manifest = {"kind": "ekfac_influence.queries", "num_queries": 2, "num_sequences": 500, "fingerprint": "abc123",
                "strategy": "ekfac", "layers": LAYERS, "config": {}, "num_train_sequences": 1000}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_export_writes_one_flat_row_per_query_side_and_sequence(query_dir):
    paths = export_report(query_dir)
    assert paths == {f: query_dir / f"report.{f}" for f in ("jsonl", "csv", "html")}
    rows = [json.loads(line) for line in paths["jsonl"].read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 + 2 + 1 + 1
    assert [(r["query_id"], r["side"], r["rank"]) for r in rows] == [
        ("q0", "positive", 1), ("q0", "positive", 2), ("q0", "positive", 3), ("q0", "negative", 1),
        ("q0", "negative", 2), ("q1", "positive", 1), ("q1", "negative", 1)]
    first = rows[0]
    assert first["sequence"] == 371 and first["score"] == 8389.6 and first["delta_logp"] == pytest.approx(8.3896)
    assert first["documents"] == "wiki; books" and first["provenance"][0]["char_span"] == [10, 60]
    assert first["per_layer"] == pytest.approx({LAYERS[0]: 4194.8, LAYERS[1]: -2097.4, LAYERS[2]: 6292.2})
    assert first["text"] == "Paris is the capital" and first["generated"] is True and first["topic"] == "geo"
    assert first["expected_topics"] == ["geography", "france"]
    assert "per_token" not in first and "tokens" not in first
    assert rows[1]["text"].startswith(SCRIPT_PAYLOAD) and rows[2]["spurious"] is True
    assert rows[5]["contrast"] == " no" and rows[5]["prompt"] == UNICODE_TEXT

    with open(paths["csv"], newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 7 and table[6]["text"] == CJK_TEXT
    assert table[0]["provenance"] == "wiki:371[10:60]; books:7[0:5]"
    assert json.loads(table[0]["per_layer"]) == first["per_layer"]
    assert float(table[3]["score"]) == -42.0 and table[3]["side"] == "negative"
    assert table[1]["text"] == rows[1]["text"] and table[5]["prompt"] == UNICODE_TEXT
    assert json.loads(table[0]["expected_topics"]) == ["geography", "france"] and table[0]["topic"] == "geo"


def test_top_keeps_at_most_that_many_sequences_per_side_and_out_dir_receives_the_files(query_dir, tmp_path):
    out = tmp_path / "elsewhere"
    paths = export_report(query_dir, formats=("jsonl", "html"), out_dir=out, top=1)
    assert set(paths) == {"jsonl", "html"} and not (query_dir / "report.jsonl").exists()
    rows = [json.loads(line) for line in paths["jsonl"].read_text(encoding="utf-8").splitlines()]
    assert [(r["query_id"], r["side"], r["rank"]) for r in rows] == [("q0", "positive", 1), ("q0", "negative", 1),
                                                                   ("q1", "positive", 1), ("q1", "negative", 1)]
    assert paths["html"].read_text(encoding="utf-8").count('<li class="hit ') == 4


def test_an_existing_report_is_not_overwritten_unless_asked(query_dir):
    export_report(query_dir, formats=("csv",))
    (query_dir / "report.csv").write_text("earlier report")
    with pytest.raises(ReportError, match=r"report\.csv.*overwrite"):
        export_report(query_dir)  # html and jsonl do not exist yet, and are not written either
    assert (query_dir / "report.csv").read_text() == "earlier report"
    assert not (query_dir / "report.html").exists() and not (query_dir / "report.jsonl").exists()
    export_report(query_dir, overwrite=True)
    assert (query_dir / "report.csv").read_text().startswith("query,query_id,prompt")
    assert not [p.name for p in query_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_malformed_or_missing_topk_file_is_named_with_its_line(query_dir, tmp_path):
    lines = (query_dir / "topk.jsonl").read_text(encoding="utf-8").splitlines()
    (query_dir / "topk.jsonl").write_text(lines[0] + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ReportError, match=r"topk\.jsonl, line 2"):
        export_report(query_dir)
    (query_dir / "topk.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c", "top_positive": [{}]}) + "\n")
    with pytest.raises(ReportError, match=r"topk\.jsonl, line 1: .*score"):
        export_report(query_dir)
    with pytest.raises(ReportError, match=r"topk\.jsonl: not found"):
        export_report(tmp_path / "nowhere")
    assert not list(query_dir.glob("report.*"))


def test_the_html_loads_nothing_from_the_network_and_escapes_every_data_string(query_dir):
    page = render_html(records(), json.loads((query_dir / "manifest.json").read_text()))
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"<link\b|@import|url\(", page)  # no external stylesheets, fonts, images
    assert page.count("<script>") == 1 and page.count("</script>") == 1  # only the page's own script
    assert "<script>window.__pwned" not in page and "<img" not in page
    assert escape(SCRIPT_PAYLOAD) in page and escape(IMG_PAYLOAD) in page
    assert escape(UNICODE_TEXT) in page and "generated</span>" in page and "spurious</span>" in page
    assert "+1.200e-01" in page  # Δlog p of the sequence with score 120, in scientific notation
    csp = html.unescape(re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page).group(1))
    assert csp.startswith("default-src 'none';") and "script-src 'sha256-" in csp and "unsafe-eval" not in csp


def test_tokens_and_layer_bars_of_every_sequence_of_a_query_share_one_scale_shown_by_a_colour_bar(query_dir):
    page = render_html(records(), {})
    q0, q1 = page.split('<section class="query" id="q-1"')
    # q0's largest |a_t| over all its sequences is 7 ("Rome"): alpha = 0.85 |a| / 7, in every sequence
    assert '<span class="tok" style="background:rgba(239,68,68,0.061)" title="+5.000e-01">Paris</span>' in q0
    assert '<span class="tok" style="background:rgba(20,184,166,0.03)" title="-2.500e-01"> is</span>' in q0
    assert '<span class="tok" title="+0.000e+00"> the</span>' in q0
    assert '<span class="tok" style="background:rgba(239,68,68,0.243)" title="+2.000e+00"> capital</span>' in q0
    assert '<span class="tok" style="background:rgba(20,184,166,0.85)" title="-7.000e+00">Rome</span>' in q0
    ticks = re.search(r'<span class="ticks">((?:<span>[^<]*</span>)*)</span>', q0).group(1)
    assert re.findall(r"<span>([^<]*)</span>", ticks) == ["-7.000e+00", "-3.500e+00", "0", "+3.500e+00", "+7.000e+00"]
    assert "rgba(20,184,166,0.85), rgba(20,184,166,0) 50%, rgba(239,68,68,0) 50%, rgba(239,68,68,0.85)" in q0
    # layer bars: full width = q0's largest |layer term|, 0.75 × 8389.6 = 6292.2; "Lyon" (−42) has −21 on layer 0
    assert 'data-layer-scale="6.292e+03"' in q0
    assert re.search(r'class="bar neg" style="right:50%;width:16\.67%"', q0)  # −0.25 × 8389.6 of 6292.2
    assert re.search(r'title="model.layers.0.mlp.up_proj: -2.100e\+01">.*?class="bar neg" style="right:50%;width:0\.17%"',
                     q0)
    # q1: its own scale (its largest |a_t| is 2: " ☃")
    assert '<span class="tok" style="background:rgba(239,68,68,0.85)" title="+2.000e+00"> ☃</span>' in q1
    assert re.findall(r"<span>([^<]*)</span>", re.search(r'<span class="ticks">((?:<span>[^<]*</span>)*)</span>', q1).group(1))[-1] \
        == "+2.000e+00"


def test_each_sequence_shows_its_standing_among_the_candidates_and_delta_logp_is_explained(query_dir):
    page = render_html(records(), {"num_train_sequences": 1000})
    standings = re.findall(r'<li class="hit (\w+)"[^>]*data-rank="(\d+)"[^>]*data-fraction="([^"]+)">'
                           r'<div class="hit-head">\s*<span class="rank">#\d+</span>\s*<span class="standing" '
                           r'title="([^"]+)">([^<]+)</span>', page)
    assert [(side, rank, float(f), text) for side, rank, f, _, text in standings] == [
        ("positive", "1", 0.001, "top 0.1%"), ("positive", "2", 0.002, "top 0.2%"), ("positive", "3", 0.003, "top 0.3%"),
        ("negative", "1", 0.001, "bottom 0.1%"), ("negative", "2", 0.002, "bottom 0.2%"),
        ("positive", "1", 0.05, "top 5.0%"), ("negative", "1", 0.05, "bottom 5.0%")]
    assert standings[3][3] == "#1 lowest score of the 1000 candidates scored"
    assert " ".join(page.split()).count("Δlog p = score / N, N = 1000 training sequences: the linear (first-order) "
                                        "change of") == 2
    # Δlog p = 8389.6 / 1000 is past ±1 nat: marked; 120 / 1000 is not
    assert re.search(r'<span class="delta beyond"[^>]*>Δlog p <b>\+8\.390e\+00</b> <i>linear estimate', page)
    assert re.search(r'<span class="delta"[^>]*>Δlog p <b>\+1\.200e-01</b></span>', page)
    assert "standing" not in render_html([{**records()[0], "num_candidates": None}], {}).split("<main>")[1]


def test_a_normalised_ranking_is_named_and_heads_each_sequence_beside_its_raw_score(query_dir):
    """query.normalize: the page says which score ranks the sequences, shows it before the raw score, and drops the
    standing among the candidates (its rank is within the rescored pool); the rows keep both scores."""
    plain, normalised = records()
    normalised = {**normalised, "ranking": "relatif (normalized_score ranks, score is raw; rescored: the scan's best "
                                           "normalised scores)",
                  "top_positive": [{**normalised["top_positive"][0], "normalized_score": 0.75, "self_influence": 144.0}],
                  "top_negative": [{**normalised["top_negative"][0], "normalized_score": -0.25, "self_influence": 4.0}]}
    (query_dir / "topk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (plain, normalised)), encoding="utf-8")
    paths = export_report(query_dir)
    page = paths["html"].read_text(encoding="utf-8")
    first, second = page.split('<section class="query"')[1:]
    assert '<span class="ranking">ranked by the raw score</span>' in first and "standing" in first
    assert ('<span class="ranking">ranked by RelatIF, score / √s(n), among the scan&#39;s best normalised scores; the '
            'raw score is shown beside it</span>') in second
    heads = re.findall(r'<span class="score normalized"[^>]*>relatif <b>([^<]+)</b></span>\s*'
                       r'<span class="score"[^>]*>score <b>([^<]+)</b></span>', second)
    assert heads == [("+7.500e-01", "+9.000e+00"), ("-2.500e-01", "-5.000e-01")]
    assert "standing" not in second and "normalized" not in first
    assert "self_influence: <b>144.0</b>" in second and "normalized_score:" not in second  # in the head, not twice
    rows = [json.loads(line) for line in paths["jsonl"].read_text(encoding="utf-8").splitlines()]
    assert [(r["query_id"], r.get("normalized_score"), r["score"]) for r in rows[-2:]] == [("q1", 0.75, 9.0),
                                                                                          ("q1", -0.25, -0.5)]
    assert rows[-1]["ranking"].startswith("relatif") and "ranking" not in rows[0]


def test_the_model_is_named_by_its_path_from_the_run_beside_its_fingerprint(query_dir, tmp_path):
    assert read_model(query_dir) is None  # a query set outside a run, and no "model" in its manifest
    run = tmp_path / "runs" / "mine"
    queries = run / "queries" / "demo"
    queries.parent.mkdir(parents=True)
    query_dir.rename(queries)
    (run / "config.fit.yaml").write_text("run: runs/mine\nmodel:\n  path: models/fit-time\n")
    assert read_model(queries) == "models/fit-time"
    (run / "config.query.yaml").write_text("run: runs/mine\nmodel:\n  path: HuggingFaceTB/SmolLM2-135M\n  dtype: float32\n")
    assert read_model(queries) == "HuggingFaceTB/SmolLM2-135M"
    (run / "manifest.json").write_text(json.dumps({"model": {"path": "/models/llama <7b>"}}))
    assert read_model(queries) == "/models/llama <7b>"
    page = export_report(queries, formats=("html",))["html"].read_text(encoding="utf-8")
    assert '<span title="the model&#39;s name or path, as the run&#39;s config gives it" data-fact="model">model ' \
           '<b>/models/llama &lt;7b&gt;</b></span>' in page
    assert 'data-fact="fingerprint">fingerprint <b>abc123</b>' in page
    manifest = json.loads((queries / "manifest.json").read_text())
    assert read_model(queries, {**manifest, "model": "set/by-query"}) == "set/by-query"


def chromium_dump(url: str, profile: Path, console: list | None = None) -> str:
    """The DOM after the page's scripts ran; the page's console messages (errors, CSP refusals) are
    appended to `console` (Chromium logs them to stderr as `INFO:CONSOLE`)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             "--enable-logging=stderr", "--v=0", "--window-size=1280,900",
             f"--user-data-dir={profile}", "--virtual-time-budget=2000", "--dump-dom", url]
    done = subprocess.run([CHROMIUM, *flags], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
    if console is not None:
        console += [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout


DRIVER = """<script>
(function () {
  var out = {}, d = document, hits = function (sel) { return d.querySelectorAll(sel).length; };
  var visible = function (sel) { return Array.prototype.filter.call(d.querySelectorAll(sel),
      function (e) { return e.getClientRects().length > 0; }).length; };
  var key = function (k) { d.dispatchEvent(new KeyboardEvent("keydown", {key: k, bubbles: true})); };
  out.tokenTexts = Array.prototype.map.call(d.querySelectorAll("li.hit .tokens"), function (e) { return e.textContent; });
  var f = d.getElementById("filter");
  f.value = "CAPITAL"; f.dispatchEvent(new Event("input"));
  out.filtered = visible("li.hit"); out.status = d.getElementById("status").textContent;
  f.value = ""; f.dispatchEvent(new Event("input"));
  d.getElementById("show-negative").click(); out.withoutNegative = visible("li.hit");
  d.getElementById("show-negative").click(); d.getElementById("show-spurious").click();
  out.withoutSpurious = visible("li.hit"); d.getElementById("show-spurious").click();
  var sort = d.getElementById("sort"); sort.value = "score"; sort.dispatchEvent(new Event("change"));
  out.negativeByScore = Array.prototype.map.call(d.querySelectorAll(".side.negative li.hit"),
      function (e) { return e.dataset.rank; }).join(",");
  key("j"); key("j"); out.focusedAfterJJ = d.querySelector(".focused").dataset.rank;
  key("n"); out.focusedAfterN = d.querySelector(".focused").id;
  key("?"); out.helpOpen = d.getElementById("help").classList.contains("open");
  out.clippedLayerPanels = Array.prototype.filter.call(d.querySelectorAll(".layers"),
      function (e) { return e.scrollHeight > e.clientHeight || e.scrollWidth > e.clientWidth; }).length;
  out.layerPanels = hits(".layers");
  d.body.dataset.test = JSON.stringify(out);
})();
</script>"""


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="headless Chromium not installed "
                    "(apt-get install -y --no-install-recommends chromium)")
def test_chromium_renders_the_report_and_injected_code_never_runs(query_dir, tmp_path):
    page_path = export_report(query_dir, formats=("html",))["html"]
    console = []
    dom = chromium_dump(page_path.as_uri(), tmp_path / "profile", console)
    assert console == []  # no error, no refused script or style: the page runs clean under its own CSP
    assert 'data-ready="1"' in dom  # the page's own script ran under its Content-Security-Policy ...
    assert "data-pwned" not in dom and "<img" not in dom  # ... and neither injected script nor handler did
    assert "&lt;script&gt;window.__pwned = 1" in dom and "&lt;img src=x onerror=" in dom  # shown as text
    assert "The capital of France is" in dom and UNICODE_TEXT in dom
    assert '<span class="tok" style="background:rgba(239,68,68,0.243)" title="+2.000e+00"> capital</span>' in dom
    assert re.search(r'class="tok" style="background:rgba\(20,184,166,0\.\d+\)"', dom)
    assert "7 of 7 sequences shown" in dom

    # Without the CSP, escaping alone must keep the payloads inert; the UI responds to input and keys.
    bare = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page_path.read_text(encoding="utf-8"))
    assert "Content-Security-Policy" not in bare
    harness = tmp_path / "harness.html"
    harness.write_text(bare.replace("</body>", DRIVER + "</body>"), encoding="utf-8")
    dom = chromium_dump(harness.as_uri(), tmp_path / "profile")
    assert 'data-ready="1"' in dom and "data-pwned" not in dom and "<img" not in dom
    state = json.loads(html.unescape(re.search(r'data-test="([^"]*)"', dom).group(1)))
    texts = state.pop("tokenTexts")  # what the browser shows of each sequence, token spans joined
    assert texts == [hit["text"] for record in records() for key in ("top_positive", "top_negative")
                     for hit in record[key]]
    assert texts[-1] == CJK_TEXT and "\ufffd" not in "".join(texts)  # non-ASCII, byte for byte
    assert state == {"filtered": 1, "status": "1 of 7 sequences shown", "withoutNegative": 4, "withoutSpurious": 6,
                     "negativeByScore": "2,1,1", "focusedAfterJJ": "2", "focusedAfterN": "q-1", "helpOpen": True,
                     "clippedLayerPanels": 0, "layerPanels": 7}

    # The probe itself works: the same payloads, unescaped on a page without protection, do run.
    control = tmp_path / "control.html"
    control.write_text(f"<!DOCTYPE html><html><body>{SCRIPT_PAYLOAD}{IMG_PAYLOAD}<script>undefinedFunction()</script>"
                       "</body></html>", encoding="utf-8")
    assert 'data-pwned="' in chromium_dump(control.as_uri(), tmp_path / "profile", console)
    assert any("undefinedFunction is not defined" in line for line in console)  # and errors do reach `console`
