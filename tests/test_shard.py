"""Factors sharded by layer (factors.shard: auto): 1, 2 and 4 gloo processes give the factors and scores
of one; each process holds about 1/world of the factors after the passes; shards load at any world size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import ekfac_influence as ei
from ekfac_influence.factors import assign_owners
from ekfac_influence.model import select_layers
from ekfac_influence.plan import STEPS, plan_fit
from ekfac_influence.storage import StorageError
from conftest import free_port, make_llama

WORKER = Path(__file__).parent / "workers" / "distributed_shard.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def launch(out: Path, processes: int, blocks: int = 1, strategy: str = "ekfac", layers: str | None = None
           ) -> dict[str, torch.Tensor]:
    """The worker alone (1) or under torchrun (gloo); rank 0's result."""
    command = [sys.executable, str(WORKER)] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", free_port(),
         str(WORKER)]
    done = subprocess.run(command + [str(out), str(blocks), strategy] + ([layers] if layers else []), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(out / "result.safetensors"))


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("one")
    return out, launch(out, 1)


def assert_same_factors(path: Path, reference: Path) -> None:
    """Every layer's A, S, eigenvalues, Λ and damping equal to float rounding (eigenvectors: up to sign)."""
    one, other = ei.Factors.load(reference), ei.Factors.load(path)
    assert one.owners is None and other.owners is None  # loaded whole
    assert other.layer_names == one.layer_names and (other.num_sequences, other.num_tokens) == (one.num_sequences, one.num_tokens)
    for a, b in zip(one.layers, other.layers):
        assert set(a.tensors()) == set(b.tensors()) == {"A_II", "S_OO", "QA_II", "QS_OO", "eigA_I", "eigS_O", "lambda_OI"}
        for key in ("A_II", "S_OO", "eigA_I", "eigS_O", "lambda_OI"):
            x, y = (getattr(f, key) for f in (a, b))
            x, y = (v.dense() if hasattr(v, "dense") else v for v in (x, y))
            assert_close(y, x, rtol=1e-9, atol=1e-12, msg=f"{a.name}/{key}")
        for key in ("QA_II", "QS_OO"):  # a rotation's columns are defined up to sign
            x, y = (getattr(f, key) for f in (a, b))
            x, y = (v.dense() if hasattr(v, "dense") else v for v in (x, y))
            assert_close(y.abs(), x.abs(), rtol=1e-6, atol=1e-9, msg=f"{a.name}/{key}")
        assert b.damping == pytest.approx(a.damping, rel=1e-9)


def assert_the_plan_is_what_was_measured(held_RS: torch.Tensor, world: int, blocks: int = 1,
                                         strategy: str = "ekfac") -> None:
    """`plan_fit` (the dry run) predicts the bytes each step held on the busiest process, to the byte."""
    model = make_llama(hidden=16, layers=6, intermediate=32)
    config = ei.FactorConfig(strategy=strategy, factor_dtype="float64", shard="auto", blocks=blocks, block_min_dim=32)
    plan = plan_fit(model, select_layers(model, None), config, world, model_dtype="float64")
    assert [plan.steps.get(step, 0) for step in STEPS] == held_RS.max(0).values.long().tolist()


def assert_same_result(result: dict, reference: dict) -> None:
    assert result["counts"].tolist() == reference["counts"].tolist() == [27, 27 * 16]
    for key in ("scores/rankNone", "scores/rank2"):
        assert_close(result[key], reference[key], rtol=1e-9, atol=1e-9, msg=key)


def test_owners_are_balanced_by_bytes_and_the_same_on_every_call():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 40, "e": 10}
    owners = assign_owners(sizes, 2)
    assert owners == assign_owners(dict(sizes), 2) == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}  # loads 140 and 120
    assert assign_owners(sizes, 1) == dict.fromkeys(sizes, 0)
    assert sorted(set(assign_owners(sizes, 8).values())) == [0, 1, 2, 3, 4]  # one layer each, three idle


def test_a_single_process_fit_with_shard_auto_writes_the_format_of_today(alone):
    out, result = alone
    assert sorted(p.name for p in (out / "factors").iterdir()) == ["factors.safetensors", "manifest.json"]
    assert int(result["world"]) == 1 and result["loaded_layers"].tolist() == [18]
    assert_the_plan_is_what_was_measured(result["held_bytes"], 1)


def test_two_processes_fit_sharded_factors_equal_to_one_process_and_hold_half(tmp_path, alone):
    reference_dir, reference = alone
    result = launch(tmp_path, 2)
    assert int(result["world"]) == 2
    assert sorted(p.name for p in (tmp_path / "factors").iterdir()) == [
        "factors.00000-of-00002.safetensors", "factors.00001-of-00002.safetensors", "manifest.json"]
    assert_same_factors(tmp_path / "factors", reference_dir / "factors")
    assert_same_result(result, reference)
    # each process loads back the 9 of 18 layers it owns, the same it fitted
    assert result["loaded_layers"].tolist() == [9, 9] and result["loaded_as_fitted"].tolist() == [True, True]
    held, alone_held = result["held_bytes"], reference["held_bytes"][0]
    # steps: covariance pass (local sums), covariances reduced, eigendecomposed, correction pass, fitted
    assert held[:, 0].tolist() == [alone_held[0].item()] * 2  # during the pass every process sums every layer
    for step in (1, 2, 4):
        assert held[:, step].sum().item() == alone_held[step].item()  # nothing lost, nothing held twice
        assert held[:, step].max().item() <= 0.55 * alone_held[step].item()
    assert_the_plan_is_what_was_measured(held, 2)
    # a missing shard is named
    (tmp_path / "factors" / "factors.00001-of-00002.safetensors").unlink()
    with pytest.raises(StorageError, match="factors.00001-of-00002.safetensors is missing"):
        ei.Factors.load(tmp_path / "factors")
    only_first = ei.Factors.load(tmp_path / "factors", shard=(0, 2))  # what process 0 of 2 needs is all there
    assert sum(only_first.held(name) for name in only_first.layer_names) == 9


@pytest.mark.slow
def test_four_processes_fit_and_score_as_one_and_hold_a_quarter(tmp_path, alone):
    reference_dir, reference = alone
    result = launch(tmp_path, 4)
    assert_same_factors(tmp_path / "factors", reference_dir / "factors")
    assert_same_result(result, reference)
    held, alone_held = result["held_bytes"], reference["held_bytes"][0]
    for step in (1, 2, 4):
        assert held[:, step].sum().item() == alone_held[step].item()
        assert held[:, step].max().item() <= 0.3 * alone_held[step].item()
    assert_the_plan_is_what_was_measured(held, 4)
    assert result["loaded_layers"].tolist() == [5, 5, 4, 4]  # each process reads its own layers back
    # four shards read by processes of another world size: each of 2 gets its layers, the same values
    whole = ei.Factors.load(reference_dir / "factors")
    halves = [ei.Factors.load(tmp_path / "factors", shard=(rank, 2)) for rank in (0, 1)]
    for name in whole.layer_names:
        (holder,) = [half for half in halves if half.held(name)]
        assert_close(holder.layer(name).lambda_OI, whole.layer(name).lambda_OI, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_two_processes_shard_block_diagonal_factors_as_one_process_fits_them(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    reference, result = launch(one, 1, blocks=2), launch(two, 2, blocks=2)
    assert_same_factors(two / "factors", one / "factors")
    assert_same_result(result, reference)
    assert_the_plan_is_what_was_measured(result["held_bytes"], 2, blocks=2)


def test_float32_accumulation_halves_the_covariance_pass_and_stays_within_float32_rounding_of_float64():
    from conftest import char_sequences, lm_batches

    from ekfac_influence import fit

    model = make_llama(hidden=16, layers=2, intermediate=32)
    train = lm_batches(char_sequences(27, 16), 4)
    fitted, held = {}, {}
    for accumulate in ("float64", "float32"):
        config = ei.FactorConfig(factor_dtype="float64", accumulate_dtype=accumulate)
        fitted[accumulate] = ei.fit_factors(model, train, ei.CausalLMObjective(), config, show_progress=False)
        held[accumulate] = dict(fit.HELD_BYTES)
    assert held["float32"]["covariance pass: local sums"] * 2 == held["float64"]["covariance pass: local sums"]
    assert held["float32"]["fitted"] == held["float64"]["fitted"]  # the means are float64 either way
    for a, b in zip(fitted["float64"].layers, fitted["float32"].layers):
        for key in ("A_II", "S_OO", "lambda_OI"):
            x, y = getattr(a, key), getattr(b, key)
            assert y.dtype == torch.float64 and not torch.equal(x, y)  # really summed in float32
            assert_close(y, x, rtol=1e-5, atol=1e-6 * float(x.abs().max()), msg=f"{a.name}/{key}")


def test_fit_dry_run_prints_the_bytes_per_process_of_a_llama_7b_built_on_the_meta_device(tmp_path, capsys):
    from transformers import LlamaConfig

    from ekfac_influence.cli import main

    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32000).save_pretrained(tmp_path / "llama7b")
    common = ["fit", "--model.path", str(tmp_path / "llama7b"), "--run", str(tmp_path / "run"), "--dry-run",
              "--model.dtype", "bfloat16", "--corpus.length", "2048", "--fit.batch_size", "1"]
    assert main(common + ["--world-size", "1", "--device-memory", "80GB"]) == 0
    alone = capsys.readouterr().out
    assert "96 tracked layers" in alone and "covariance pass: local sums" in alone
    assert "98.67 GiB" in alone  # the float64 covariance sums of the 96 MLP linears (docs/scaling.md)
    assert "does NOT fit in 80.00 GiB" in alone
    assert main(common + ["--world-size", "8", "--factors.shard", "auto", "--factors.accumulate_dtype", "float32",
                          "--factors.memory_budget_gb", "16"]) == 0
    sharded = capsys.readouterr().out
    assert "factors sharded by layer" in sharded and "world 8" in sharded
    assert not (tmp_path / "run").exists()  # nothing fitted, nothing written
    assert main(common + ["--device-memory", "lots"]) == 2
    assert "device memory 'lots' is not a size like 80GB" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_shard_kfac_factors_as_one_process_fits_them(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    reference, result = launch(one, 1, strategy="kfac"), launch(two, 2, strategy="kfac")
    assert_same_factors(two / "factors", one / "factors")
    assert_same_result(result, reference)
    assert_the_plan_is_what_was_measured(result["held_bytes"], 2, strategy="kfac")


@pytest.mark.slow
def test_four_processes_with_three_layers_leave_one_process_without_factors_and_still_score_as_one(tmp_path_factory):
    one, four = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("four")
    pattern = r"layers\.[0-2]\.mlp\.down_proj"
    reference, result = launch(one, 1, layers=pattern), launch(four, 4, layers=pattern)
    assert result["loaded_layers"].tolist() == [1, 1, 1, 0]
    assert len(list((four / "factors").glob("factors.*-of-00004.safetensors"))) == 4  # an empty shard too
    assert_same_factors(four / "factors", one / "factors")
    assert_same_result(result, reference)


def test_refinement_refuses_sharded_factors_by_name():
    import dataclasses

    from conftest import char_sequences, lm_batches, query_batches

    model = make_llama()
    train = lm_batches(char_sequences(8, 16), 4)
    factors = ei.fit_factors(model, train, ei.CausalLMObjective(), ei.FactorConfig(), show_progress=False)
    sharded = dataclasses.replace(factors, owners=dict.fromkeys(factors.layer_names, 0))
    with pytest.raises(ValueError, match="these factors are sharded"):
        ei.compute_scores(model, sharded, query_batches([("a", " b")]), train, ei.CausalLMObjective(),
                          ei.ScoreConfig(refine_steps=1), show_progress=False)
