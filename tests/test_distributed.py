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
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                               str(WORKER), str(model_path), str(out_path)], env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    two = load_file(str(out_path))
    assert int(two["world"]) == 2 and int(single["world"]) == 1
    assert two["counts"].tolist() == single["counts"].tolist() == [27, 27 * 16, 27]  # none dropped, none counted twice
    for key, value in single.items():
        if key != "world":
            assert_close(two[key], value, rtol=1e-9, atol=1e-12, msg=key)
