"""The command line end to end on a tiny model in a fresh directory: fit, index, query, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import bpe_tokenizer
from ekfac_influence.cli import build_parser, main
from ekfac_influence.demo import pydoc_documents


def run_cli(*args, cwd, **extra_env):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra_env)
    return subprocess.run([sys.executable, "-m", "ekfac_influence", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def make_project(root) -> None:
    """A tiny Llama with its tokenizer, a JSONL corpus, a queries file and a config, as a user would have."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "corpus.jsonl", "w") as handle:
        for topic, text in pydoc_documents()[:3]:
            handle.write(json.dumps({"name": topic, "text": text[:1500]}) + "\n")
    (root / "queries.jsonl").write_text(
        json.dumps({"id": "assert", "prompt": "The assert statement", "completion": " is a debugging aid"}) + "\n"
        + json.dumps({"id": "greedy", "prompt": "x = 1"}) + "\n")
    config = {"run": "runs/tiny", "model": {"path": "model"},
              "corpus": {"path": "corpus.jsonl", "id_column": "name", "length": 32},
              "fit": {"batch_size": 4}, "queries": {"file": "queries.jsonl", "name": "first"},
              "query": {"rank": 4, "rerank": 6, "top_k": 3, "candidates": "shortlist", "shortlist_k": 12,
                        "max_new_tokens": 4, "batch_size": 4}}
    (root / "run.yaml").write_text("# ekfac-influence fit --config run.yaml\n" + yaml.safe_dump(config))


@pytest.mark.slow
def test_fit_index_query_export_from_the_command_line_in_a_fresh_directory(tmp_path):
    make_project(tmp_path)
    for stage in ("fit", "index", "query", "export"):
        done = run_cli(stage, "--config", "run.yaml", "--quiet", cwd=tmp_path)
        assert done.returncode == 0, f"{stage}: {done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr
        if stage == "query":
            assert "[assert] 'The assert statement' -> ' is a debugging aid'" in done.stdout
            assert "the model's greedy completion" in done.stdout
            assert "report: ekfac-influence export --config runs/tiny/config.query.yaml" in done.stdout
    run = tmp_path / "runs" / "tiny"
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"fit", "index", "query"} and manifest["layers"]
    seconds = json.loads((run / "factors" / "manifest.json").read_text())["meta"]["seconds"]  # where the fit's time went
    assert list(seconds) == ["covariances", "eigendecomposition", "eigenvalue correction"] and min(seconds.values()) > 0
    saved = yaml.safe_load((run / "config.fit.yaml").read_text())
    assert saved["corpus"]["length"] == 32 and saved["factors"]["strategy"] == "ekfac"  # the resolved config
    out = run / "queries" / "first"
    records = [json.loads(line) for line in (out / "topk.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["assert", "greedy"] and records[1]["generated"]
    assert all(r["num_candidates"] == 12 for r in records)
    hit = records[0]["top_positive"][0]
    assert hit["provenance"][0]["doc"] in {name for name, _ in pydoc_documents()[:3]}
    assert sum(hit["per_token"]) == pytest.approx(hit["score"], rel=1e-4)
    for name in ("report.jsonl", "report.csv", "report.html"):
        assert (out / name).stat().st_size > 0
    shape = json.loads((out / "manifest.json").read_text())["scores"]["shape"]
    scores = np.fromfile(out / "scores.f32", dtype=np.float32).reshape(shape)
    assert np.isfinite(scores).sum(1).min() >= 12

    # a finished stage is reused, not recomputed; a finished query set is not overwritten
    again = run_cli("fit", "--config", "run.yaml", "--quiet", cwd=tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    before = {p: p.read_bytes() for p in out.iterdir()}
    refused = run_cli("query", "--config", "run.yaml", "--quiet", cwd=tmp_path)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert {p: p.read_bytes() for p in out.iterdir()} == before
    # one query from the command line, with a dotted override, into another query set
    single = run_cli("query", "--config", "run.yaml", "--quiet", "--queries.name", "cli", "--query.rank", "2",
                     "--prompt", "The while statement", "--completion", " repeats", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    assert json.loads((run / "queries" / "cli" / "manifest.json").read_text())["config"]["rank"] == 2
    # a one-off question gets its report at once, named in one line; no placeholder to fill in
    assert f"html: {os.path.join('runs', 'tiny', 'queries', 'cli', 'report.html')}" in single.stdout
    assert (run / "queries" / "cli" / "report.html").stat().st_size > 0 and "..." not in single.stdout.splitlines()[-1]
    # show: the finished sets as they are, nothing recomputed (no model is loaded: the model may be gone)
    stamps = {p: p.stat().st_mtime_ns for p in (run / "queries").rglob("*")}
    (tmp_path / "model").rename(tmp_path / "model.away")
    shown = run_cli("show", "runs/tiny", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "queries/cli" in shown.stdout and "queries/first" in shown.stdout
    assert "[assert] 'The assert statement' -> ' is a debugging aid'" in shown.stdout and "  +1 score" in shown.stdout
    opened = run_cli("show", "--run", "runs/tiny", "--queries.name", "first", "--open", cwd=tmp_path, BROWSER="true")
    assert opened.returncode == 0 and f"report: {os.path.join('runs', 'tiny', 'queries', 'first', 'report.html')}" \
        in opened.stdout and "queries/cli" not in opened.stdout, opened.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (run / "queries").rglob("*")} == stamps


def test_help_lists_every_override_with_its_field_doc(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["query", "--help"])
    text = capsys.readouterr().out
    assert "--query.rerank" in text and "full-rank query gradients" in text
    assert "--model.path" in text and "--prompt" in text


def test_a_typo_in_an_override_is_named_with_a_suggestion(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("query:\n  rnak: 3\n")
    assert main(["fit", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown key query.rnak (did you mean query.rank?)" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_moved_or_copied_run_directory_works_from_its_own_saved_config(tmp_path):
    """Paths in a saved config resolve relative to it; the corpus is known by its content, not its path's spelling."""
    import shutil

    make_project(tmp_path)
    for stage in ("fit", "index", "query"):
        done = run_cli(stage, "--config", "run.yaml", "--quiet", cwd=tmp_path)
        assert done.returncode == 0, f"{stage}: {done.stderr[-3000:]}"
    saved = yaml.safe_load((tmp_path / "runs" / "tiny" / "config.query.yaml").read_text())
    assert saved["run"] == "." and saved["model"]["path"] == str(tmp_path / "model")
    (tmp_path / "elsewhere").mkdir()
    shutil.move(tmp_path / "runs" / "tiny", tmp_path / "elsewhere" / "moved")
    moved = tmp_path / "elsewhere" / "moved"
    # from another working directory, with only the run's own config
    exported = run_cli("export", "--config", str(moved / "config.query.yaml"), cwd=tmp_path / "elsewhere")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (moved / "queries" / "first" / "report.html").exists()
    again = run_cli("query", "--config", "moved/config.query.yaml", "--quiet", "--queries.name", "again",
                    "--prompt", "The while statement", "--completion", " repeats", cwd=tmp_path / "elsewhere")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((moved / "queries" / "again" / "topk.jsonl").read_text().splitlines()[0])["top_positive"]
    # the original config pointed at the moved run, its corpus spelled another way: same corpus, nothing to do
    shutil.copytree(moved, tmp_path / "copy")
    reused = run_cli("fit", "--config", "run.yaml", "--quiet", "--run", "copy", "--corpus.path", "./corpus.jsonl",
                     cwd=tmp_path)
    assert reused.returncode == 0 and "nothing to do" in reused.stdout, reused.stderr[-2000:]
    # another corpus under the same name: refused, saying what differs
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"name": "x", "text": "another text entirely"}) + "\n")
    refused = run_cli("fit", "--config", "run.yaml", "--quiet", "--run", "copy", cwd=tmp_path)
    assert refused.returncode == 2 and "the content of" in refused.stderr and "Traceback" not in refused.stderr
    longer = run_cli("index", "--config", str(tmp_path / "copy" / "config.fit.yaml"), "--corpus.length", "64",
                     cwd=tmp_path)
    assert longer.returncode == 2 and "corpus.length = 32 (now 64)" in longer.stderr, longer.stderr


def test_help_shows_choices_and_defaults_as_a_user_would_type_them(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--factors.strategy {identity,diagonal,kfac,ekfac,lissa,exact}" in text
    assert "--model.dtype {float32,float64,bfloat16,float16}" in text
    assert "(default: null)" in text and "(default: true)" in text and "'" not in text.split("--factors.layers")[1][:300]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["index", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "term-frequency saturation" in text and "changes no score" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--help"])
    assert "(default: [jsonl, csv, html])" in " ".join(capsys.readouterr().out.split())


def test_a_bad_choice_is_one_line_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["fit", "--factors.strategy", "ekafc"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "invalid choice: 'ekafc'" in err and "'ekfac'" in err


def test_help_and_version_import_neither_torch_nor_transformers():
    """What keeps --help fast (docs/benchmarks.md measures it): nothing heavy before the arguments are parsed."""
    code = ("import sys\nfrom ekfac_influence.cli import main\nfor argv in (['--help'], ['--version'], ['query', '--help'], "
            "['show', '--help'], ['evaluate', '--help']):\n    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'pandas', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_show_names_the_query_sets_a_run_holds(tmp_path, capsys):
    (tmp_path / "queries" / "first").mkdir(parents=True)
    (tmp_path / "queries" / "first" / "topk.jsonl").write_text("{}\n")
    assert main(["show", str(tmp_path), "--queries.name", "firts"]) == 2
    err = capsys.readouterr().err
    assert "holds no finished query set; query sets in" in err and "first" in err and "Traceback" not in err


def test_a_hugging_face_id_in_the_local_cache_loads_offline(tmp_path):
    """model.path = org/name works from the cache layout (models--org--name/snapshots/<hash>, refs/main), no network."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bpe_tokenizer()
    snapshot = tmp_path / "hf" / "hub" / "models--someorg--tiny-llama" / "snapshots" / ("ab" * 20)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("ab" * 20)
    code = ("import ekfac_influence as ei\nmodel, tokenizer = ei.load_causal_lm('someorg/tiny-llama')\n"
            "print(type(model).__name__, len(tokenizer))\n"
            "try:\n    ei.load_causal_lm('someorg/not-cached')\nexcept ei.ModelLoadError as error:\n    print(error)\n")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == f"LlamaForCausalLM {len(tokenizer)}"
    assert "model someorg/not-cached does not exist: not a local path, nor a Hugging Face id in the local cache" in lines[1]


def test_a_hugging_face_dataset_id_in_the_local_cache_loads_offline(tmp_path):
    """corpus.path = org/name reads the cached snapshot (datasets--org--name), its splits named by its files."""
    snapshot = tmp_path / "hf" / "hub" / "datasets--someorg--notes" / "snapshots" / ("cd" * 20)
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "data" / "train.jsonl").write_text('{"text": "first note"}\n{"text": "second note"}\n')
    (snapshot / "data" / "test.jsonl").write_text('{"text": "held-out note"}\n')
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("cd" * 20)
    code = ("import ekfac_influence as ei\nfrom ekfac_influence.data import corpus_source\n"
            "print(list(ei.load_corpus('someorg/notes')['text']))\n"
            "print(list(ei.load_corpus('someorg/notes', split='test')['text']))\n"
            "print(corpus_source('someorg/notes')['sha256'] == corpus_source(" + repr(str(snapshot)) + ")['sha256'])\n"
            "try:\n    ei.load_corpus('someorg/not-cached')\nexcept ei.DataError as error:\n    print(error)\n")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[:3] == ["['first note', 'second note']", "['held-out note']", "True"]
    assert "corpus someorg/not-cached does not exist: not a local path, nor a Hugging Face dataset id" in lines[3]
