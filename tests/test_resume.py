"""Kill tests: SIGKILL a fit during its covariance pass and its eigenvalue-correction pass, a query during
its scan, and a self-influence audit during its pass; the rerun resumes from the saved partial sums and ends
with exactly the factors, scores and audit of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import bpe_tokenizer, free_port
from ekfac_influence.demo import pydoc_documents

pytestmark = pytest.mark.slow
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def command(stage: str, run: str, *extra) -> list[str]:
    return [sys.executable, "-m", "ekfac_influence", stage, "--config", "run.yaml", "--quiet", "--run", run, *extra]


def niced(argv: list[str]) -> list[str]:
    """The killed process runs at the lowest priority, so that the test's poller sees every batch."""
    return ["nice", "-n", "19", *argv]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("project")
    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "corpus.jsonl", "w") as handle:
        for topic, text in pydoc_documents()[:4]:
            handle.write(json.dumps({"name": topic, "text": text[:3000]}) + "\n")
    (root / "queries.jsonl").write_text(json.dumps({"id": "a", "prompt": "The assert statement", "completion": " is a debugging aid"}) + "\n")
    config = {"model": {"path": "model"}, "corpus": {"path": "corpus.jsonl", "id_column": "name", "length": 32},
              "fit": {"batch_size": 1, "checkpoint_batches": 1}, "factors": {"factor_dtype": "float64"},
              "queries": {"file": "queries.jsonl", "name": "q"},
              "query": {"rank": 4, "rerank": 5, "top_k": 3, "batch_size": 1, "checkpoint_batches": 1, "compute_dtype": "float64"}}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    for stage in ("fit", "query"):
        done = subprocess.run(command(stage, "runs/reference"), cwd=root, env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return root


def kill_when(process: subprocess.Popen, progress: Path | list[Path], at_batch: int, timeout: float = 600, *,
              group: bool = False) -> int:
    """SIGKILL the process once `progress` (a checkpoint's JSON, or each of several: one per process)
    says the next batch to read is at least `at_batch`.

    group: also every process below it (a launcher's workers, in their own sessions).
    """
    files = progress if isinstance(progress, list) else [progress]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the process ended before it could be killed (its pass was shorter than {at_batch} batches?)")
        done = min(next_batch(f) for f in files)
        if done >= at_batch:
            for pid in [process.pid, *(descendants(process.pid) if group else [])]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait()
            if group:
                time.sleep(0.5)  # the workers' exits
            return done
        time.sleep(0.002)
    process.kill()
    pytest.fail(f"{progress} never reached batch {at_batch}")


def next_batch(progress: Path) -> int:
    try:
        return json.loads(progress.read_text())["next_batch"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children first found, then theirs)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def assert_same_factors(a: Path, b: Path) -> None:
    first, second = load_file(str(a / "factors.safetensors")), load_file(str(b / "factors.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-12, atol=1e-15, msg=key)


@pytest.mark.parametrize("pass_name", ["covariances", "correction"])
def test_a_fit_killed_midway_resumes_and_gives_the_factors_of_an_uninterrupted_fit(project, pass_name):
    run = f"runs/killed-{pass_name}"
    process = subprocess.Popen(niced(command("fit", run)), cwd=project, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reached = kill_when(process, project / run / "factors.partial" / f"{pass_name}.rank0.json", at_batch=5)
    total = int(json.loads((project / "runs/reference/manifest.json").read_text())["num_sequences"])
    assert reached < total  # killed in the middle of the pass
    assert not (project / run / "factors").exists()
    resumed = subprocess.run(command("fit", run), cwd=project, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming the {pass_name} pass at batch" in resumed.stdout
    assert_same_factors(project / "runs/reference/factors", project / run / "factors")
    assert not (project / run / "factors.partial").exists()


def test_a_query_killed_during_its_scan_resumes_and_gives_the_scores_of_an_uninterrupted_one(project):
    import shutil

    run = "runs/killed-scan"
    shutil.copytree(project / "runs/reference", project / run, ignore=shutil.ignore_patterns("queries"))
    process = subprocess.Popen(niced(command("query", run)), cwd=project, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_when(process, project / run / "queries" / ".q.partial" / "scan.rank0.json", at_batch=5)
    assert not (project / run / "queries" / "q").exists()
    resumed = subprocess.run(command("query", run), cwd=project, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the scan at batch" in resumed.stdout
    reference, again = project / "runs/reference/queries/q", project / run / "queries" / "q"
    np.testing.assert_array_equal(np.fromfile(again / "scores.f32", dtype=np.float32),
                                  np.fromfile(reference / "scores.f32", dtype=np.float32))
    assert (again / "topk.jsonl").read_text() == (reference / "topk.jsonl").read_text()
    assert not (project / run / "queries" / ".q.partial").exists()


AUDIT = ("--self_influence.batch_size", "1", "--self_influence.checkpoint_batches", "1",
         "--self_influence.compute_dtype", "float64")


@pytest.fixture(scope="module")
def audited(project) -> Path:
    """The `self-influence` stage run once, on one process, uninterrupted: <run>/self_influence."""
    import shutil

    shutil.copytree(project / "runs/reference", project / "runs/audited", ignore=shutil.ignore_patterns("queries"))
    done = subprocess.run(command("self-influence", "runs/audited", *AUDIT), cwd=project, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return project / "runs/audited/self_influence"


def assert_same_audit(first: Path, again: Path) -> None:
    np.testing.assert_array_equal(np.fromfile(again / "self_influence.f32", dtype=np.float32),
                                  np.fromfile(first / "self_influence.f32", dtype=np.float32))
    assert (again / "top.jsonl").read_text() == (first / "top.jsonl").read_text()


def test_a_self_influence_audit_killed_midway_resumes_and_gives_the_audit_of_an_uninterrupted_one(project, audited):
    """SIGKILL the `self-influence` stage in its pass over the corpus; the rerun takes the saved batches from the
    checkpoint and writes the same s(n), extremes, per-token values and near-duplicate groups."""
    import shutil

    run = "runs/killed-audit"
    shutil.copytree(project / "runs/reference", project / run, ignore=shutil.ignore_patterns("queries"))
    process = subprocess.Popen(niced(command("self-influence", run, *AUDIT)), cwd=project, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reached = kill_when(process, project / run / ".self_influence.partial" / "self_influence.rank0.json", at_batch=5)
    total = int(json.loads((audited / "manifest.json").read_text())["num_sequences"])
    assert reached < total  # killed in the middle of the pass
    assert not (project / run / "self_influence").exists()
    resumed = subprocess.run(command("self-influence", run, *AUDIT), cwd=project, env=ENV, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming self-influence at batch" in resumed.stdout
    assert_same_audit(audited, project / run / "self_influence")
    assert not (project / run / ".self_influence.partial").exists()


def test_the_self_influence_stage_on_two_processes_writes_the_audit_of_one(project, audited):
    """torchrun (gloo), 2 processes: each audits its share of the batches, the main process writes the merged
    result; the same s(n), extremes and groups as one process."""
    import shutil

    run = "runs/audit-two"
    shutil.copytree(project / "runs/reference", project / run, ignore=shutil.ignore_patterns("queries"))
    config = yaml.safe_load((project / "run.yaml").read_text())
    (project / "audit-two.yaml").write_text(yaml.safe_dump(dict(config, run=run)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(), "-m",
              "ekfac_influence", "self-influence", "--config", "audit-two.yaml", "--quiet", *AUDIT]
    done = subprocess.run(launch, cwd=project, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((project / run / "self_influence" / "manifest.json").read_text())["num_sequences"] > 2
    assert_same_audit(audited, project / run / "self_influence")


def test_a_two_process_fit_killed_midway_resumes_and_gives_the_factors_of_one_process(project):
    """torchrun (gloo) with 2 processes; SIGKILL to the whole process group during the covariance pass."""
    run = "runs/killed-two"
    # torchrun would take --run for its own --run-path: the run directory goes into the config instead
    config = yaml.safe_load((project / "run.yaml").read_text())
    (project / "two.yaml").write_text(yaml.safe_dump(dict(config, run=run)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(), "-m",
              "ekfac_influence", "fit", "--config", "two.yaml", "--quiet"]
    process = subprocess.Popen(niced(launch), cwd=project, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # both processes have saved (each resumes from its own sums; the message is the main process's)
    reached = kill_when(process, [project / run / "factors.partial" / f"covariances.rank{r}.json" for r in (0, 1)],
                        at_batch=5, group=True)
    assert not (project / run / "factors").exists()
    state = {f.name: json.loads(f.read_text()).get("next_batch") for f in (project / run / "factors.partial").glob("*.json")}
    assert "covariances.done.json" not in state, state  # killed in the middle of the covariance pass
    resumed = subprocess.run(launch, cwd=project, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the covariances pass at batch" in resumed.stdout, (reached, state)
    first, second = (load_file(str(project / r / "factors" / "factors.safetensors")) for r in ("runs/reference", run))
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-9, atol=1e-12, msg=key)


def test_a_sharded_two_process_fit_killed_in_its_correction_pass_resumes_to_the_factors_and_scores_of_one_process(project):
    """factors.shard: auto under torchrun (gloo, 2 processes): SIGKILL to the process group during the
    correction pass (each process has saved the covariances it owns); the rerun resumes, writes one
    shard per process, and the factors, loaded whole, and a 2-process query over them equal the
    1-process run's."""
    import numpy as np

    from ekfac_influence import Factors

    run = "runs/killed-sharded"
    config = yaml.safe_load((project / "run.yaml").read_text())
    config = dict(config, run=run, factors=dict(config["factors"], shard="auto"))
    (project / "sharded.yaml").write_text(yaml.safe_dump(config))

    def launch(stage: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(), "-m",
                "ekfac_influence", stage, "--config", "sharded.yaml", "--quiet"]

    process = subprocess.Popen(niced(launch("fit")), cwd=project, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_when(process, [project / run / "factors.partial" / f"correction.rank{r}.json" for r in (0, 1)], at_batch=4,
              group=True)
    assert not (project / run / "factors").exists()
    saved = {f.name for f in (project / run / "factors.partial").glob("*.json")}
    assert {"covariances.owned.rank0.json", "covariances.owned.rank1.json"} <= saved, saved
    resumed = subprocess.run(launch("fit"), cwd=project, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the correction pass at batch" in resumed.stdout
    assert sorted(p.name for p in (project / run / "factors").iterdir()) == [
        "factors.00000-of-00002.safetensors", "factors.00001-of-00002.safetensors", "manifest.json"]
    reference, sharded = Factors.load(project / "runs/reference/factors"), Factors.load(project / run / "factors")
    for a, b in zip(reference.layers, sharded.layers):
        for key in ("A_II", "S_OO", "eigA_I", "eigS_O", "lambda_OI"):
            torch.testing.assert_close(getattr(b, key), getattr(a, key), rtol=1e-9, atol=1e-12, msg=f"{a.name}/{key}")
    queried = subprocess.run(launch("query"), cwd=project, env=ENV, capture_output=True, text=True, timeout=600)
    assert queried.returncode == 0, queried.stderr[-3000:]
    np.testing.assert_allclose(np.fromfile(project / run / "queries/q/scores.f32", dtype=np.float32),
                               np.fromfile(project / "runs/reference/queries/q/scores.f32", dtype=np.float32),
                               rtol=1e-5, atol=1e-6)
