"""The user's path: `ekfac-influence demo` end to end (a quick variant), and what it leaves on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ekfac_influence as ei
from ekfac_influence.demo import QUERIES


def run_cli(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "ekfac_influence", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_the_quick_demo_runs_from_the_command_line_and_writes_a_complete_run(tmp_path):
    done = run_cli("demo", "--quick", "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mean fraction of top sequences from the query's topic" in done.stdout
    assert "report.html" in done.stdout
    run = tmp_path / "run"
    out = run / "queries" / "demo"
    records = [json.loads(line) for line in (out / "topk.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [q[1] for q in QUERIES]
    for record in records:
        scores = [hit["score"] for hit in record["top_positive"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 5
        assert all(hit["provenance"][0]["doc"] and hit["text"] for hit in record["top_positive"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mean_fraction_from_topic"] >= 0.5  # quick variant: measured 0.70
    shape = json.loads((out / "manifest.json").read_text())["scores"]["shape"]
    assert shape == [len(QUERIES), summary["num_sequences"]]
    assert np.fromfile(out / "scores.f32", dtype=np.float32).size == shape[0] * shape[1]
    factors = ei.Factors.load(run / "factors")
    assert factors.strategy == "ekfac" and factors.num_sequences == summary["num_sequences"]
    assert "<html" in (out / "report.html").read_text()[:200].lower()

    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    refused = run_cli("demo", "--quick", "--out", "run", cwd=tmp_path)
    assert refused.returncode == 2
    assert "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_the_demo_refuses_a_finished_run_and_a_foreign_directory_and_restarts_an_interrupted_one(tmp_path):
    from ekfac_influence.demo import _claim
    from ekfac_influence.storage import StorageError

    _claim(tmp_path / "absent", overwrite=False)  # nothing there: nothing to do
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="is not a demo run"):
        _claim(foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    demo = tmp_path / "demo"
    (demo / "data").mkdir(parents=True)
    (demo / "data" / "pydoc_topics.jsonl").write_text("{}\n")
    (demo / "summary.json").write_text("{}")
    with pytest.raises(StorageError, match="already holds a finished demo"):
        _claim(demo, overwrite=False)
    assert (demo / "summary.json").exists()
    _claim(demo, overwrite=True)
    assert not demo.exists()
    (demo / "data").mkdir(parents=True)
    (demo / "data" / "pydoc_topics.jsonl").write_text("{}\n")  # interrupted: no summary yet
    _claim(demo, overwrite=False)
    assert not demo.exists()
