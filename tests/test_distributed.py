"""Two processes (gloo, CPU) give the factors and scores of one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from conftest import free_port

WORKER = Path(__file__).parent / "workers" / "distributed_fit_and_score.py"


@pytest.mark.slow
def test_two_processes_give_the_factors_and_scores_of_one_with_an_uneven_last_batch(tmp_path, trained_llama):
    sys.path.insert(0, str(WORKER.parent))
    from distributed_fit_and_score import run

    model_path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained_llama.state_dict().items()}, str(model_path))
    single = run(str(model_path))
    out_path = tmp_path / "two.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                               str(WORKER), str(model_path), str(out_path)], env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    two = load_file(str(out_path))
    assert int(two["world"]) == 2 and int(single["world"]) == 1
    assert two["counts"].tolist() == single["counts"].tolist() == [27, 27 * 16, 27]  # none dropped, none counted twice
    # the three query batches are split: each process preconditions its share, not all of them
    assert single["queries_by_process"].tolist() == [3] and two["queries_by_process"].tolist() == [2, 1]
    for key, value in single.items():
        if key not in ("world", "queries_by_process"):
            assert_close(two[key], value, rtol=1e-9, atol=1e-12, msg=key)


def run_alone_and_on_two_processes(worker: Path, one: Path, two: Path, *arguments: str) -> None:
    """The worker script alone, then under torchrun with 2 processes (gloo), each given its output path (and arguments)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for out, command in ((one, [sys.executable, str(worker)]),
                         (two, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                "--master_port", free_port(), str(worker)])):
        launched = subprocess.run(command + [str(out), *arguments], env=env, capture_output=True, text=True, timeout=600)
        if launched.returncode != 0 and TEARDOWN_ABORT in launched.stderr:  # once more: see TEARDOWN_ABORT
            launched = subprocess.run(command + [str(out), *arguments], env=env, capture_output=True, text=True,
                                      timeout=600)
        assert launched.returncode == 0, launched.stderr[-3000:]


TEARDOWN_ABORT = "terminate called without an active exception"
"""A gloo worker thread outliving the interpreter at exit (pytorch/pytorch#179291): rarely, one process of a 2-process
run dies of SIGABRT after its work is done (seen in two fresh-clone runs of the whole suite, the second after
`distributed` began destroying the process group at exit; never in 22 runs of the FSDP worker alone). Such a run
is repeated once; its results are still compared in full."""


@pytest.mark.slow
def test_two_processes_answer_queries_as_one_does(tmp_path):
    """Scan shards, the shared memory-mapped scores, merged top-k lists and the rescoring stage."""
    import json

    import numpy as np

    run_alone_and_on_two_processes(WORKER.parent / "distributed_query.py", tmp_path / "one", tmp_path / "two")
    shape = json.loads((tmp_path / "one" / "manifest.json").read_text())["scores"]["shape"]
    one, two = (np.fromfile(tmp_path / name / "scores.f32", dtype=np.float32).reshape(shape) for name in ("one", "two"))
    np.testing.assert_allclose(two, one, rtol=1e-6, atol=1e-7)
    one_split, two_split = (json.loads((tmp_path / f"{name}.split.json").read_text()) for name in ("one", "two"))
    # 3 queries, each preconditioned once at full rank (truncated for the scan, sliced for the rescoring)
    assert one_split == [3] and sum(two_split) == 3 and max(two_split) < 3
    scanned = np.ones(27, dtype=bool)
    scanned[[21, 23, 25]] = False  # in no query's shortlist
    assert np.isfinite(one[:, scanned]).all() and np.isnan(one[:, ~scanned]).all()
    records = [[json.loads(line) for line in (tmp_path / name / "topk.jsonl").read_text().splitlines()] for name in ("one", "two")]
    for a, b in zip(*records):
        assert a["completion"] == b["completion"]
        for side in ("top_positive", "top_negative"):
            assert [h["sequence"] for h in a[side]] == [h["sequence"] for h in b[side]]
            np.testing.assert_allclose([h["score"] for h in a[side]], [h["score"] for h in b[side]], rtol=1e-9)
            np.testing.assert_allclose([h["per_token"] for h in a[side]], [h["per_token"] for h in b[side]], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["none", "auto"])
def test_a_model_sharded_with_fsdp_over_two_processes_gives_the_factors_and_scores_of_one_process(tmp_path, shard):
    """FSDP2 keeps half of every weight on each process; the hooks still see full activations. With
    factors.shard = auto each process also owns half of the layers' factors (issue 20)."""
    run_alone_and_on_two_processes(WORKER.parent / "distributed_fsdp.py", tmp_path / "one.safetensors",
                                   tmp_path / "two.safetensors", shard)
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert int(one["sharded"]) == 0 and int(two["sharded"]) == 1
    assert int(two["owners"]) == (2 if shard == "auto" else 0)
    assert torch.equal(one["fingerprint"], two["fingerprint"])  # the same model, whether sharded or not
    for key, value in one.items():
        if key not in ("sharded", "fingerprint", "owners") and not key.endswith("QA_II"):
            assert_close(two[key], value, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.slow
def test_two_processes_fit_the_experts_of_a_mixture_of_experts_model_as_one_does(tmp_path):
    """Per-expert A_e, S_e, Λ_e (each process routes its own tokens) and the scores of a tiny Mixtral, 1 vs 2 processes."""
    run_alone_and_on_two_processes(WORKER.parent / "distributed_moe.py", tmp_path / "one.safetensors",
                                   tmp_path / "two.safetensors")
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert int(one["world"]) == 1 and int(two["world"]) == 2
    assert one["counts"].tolist() == two["counts"].tolist() == [11, 11 * 12]
    assert sum(".experts." in key for key in one) == 3 * 2 * 4 * 2  # A, S, Λ of 2 projections × 4 experts × 2 blocks
    for key, value in one.items():
        if key != "world":
            assert_close(two[key], value, rtol=1e-9, atol=1e-12, msg=key)


def test_a_late_second_process_meets_the_main_one_in_the_same_collectives(tmp_path):
    """`index` under torchrun with the second process arriving 4 s late: by then the main process has packed
    the corpus and built the index, and waits in the barrier after each. The late process takes the main
    process's decisions instead of finding those files and skipping the barriers (which hung both: seen
    in a 2-process fit under load)."""
    import json

    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import bpe_tokenizer
    from ekfac_influence.demo import pydoc_documents

    tokenizer = bpe_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(
        tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with open(tmp_path / "corpus.jsonl", "w") as handle:
        for topic, text in pydoc_documents()[:3]:
            handle.write(json.dumps({"name": topic, "text": text[:2000]}) + "\n")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"run": str(tmp_path / "run"), "model": {"path": str(tmp_path / "model")},
                                                       "corpus": {"path": str(tmp_path / "corpus.jsonl"), "length": 32}}))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               free_port(), str(WORKER.parent / "distributed_late_rank.py"), str(tmp_path / "run.yaml"), "4"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "rank 0: done, 2 processes" in launched.stdout and "rank 1: done, 2 processes" in launched.stdout
    assert (tmp_path / "run" / "index").is_dir()
