"""Runs that stay right when the world is not: concurrent writers, stale locks, a corpus repacked after the fit,
full disks (issue 18). The bad inputs refused in one line are test_validation's table; these need more than one
command, a second process, or a look at the results."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ekfac_influence.cli import main
from ekfac_influence.storage import StorageError, stage_lock
from test_cli import make_project

RUN = "runs/tiny"


def run_main(root: Path, *argv: str) -> int:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return main(list(argv))
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """make_project's files (nothing run yet)."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("robust") / "project"
    root.mkdir()
    make_project(root)
    yield root
    transformers.utils.logging.enable_progress_bar()
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def fitted(project, tmp_path_factory):
    root = tmp_path_factory.mktemp("robust_fitted") / "project"
    shutil.copytree(project, root)
    assert run_main(root, "fit", "--config", "run.yaml", "--quiet") == 0
    return root


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


# ----------------------------------------------------------------------------- one writer per stage

# A fit that, once it holds the lock, waits in fit_factors until the test says go: the other fit then meets the lock
# whatever the machine's load (no timing guess).
WAITING_FIT = """
import sys, time
from pathlib import Path
import ekfac_influence.run as run
real = run.fit_factors
def waiting(*args, **kwargs):
    Path("holding").touch()
    deadline = time.time() + 300
    while not Path("go").exists() and time.time() < deadline:
        time.sleep(0.1)
    return real(*args, **kwargs)
run.fit_factors = waiting
from ekfac_influence.cli import main
sys.exit(main(["fit", "--config", "run.yaml", "--quiet"]))
"""


@pytest.mark.slow
def test_two_concurrent_fits_one_proceeds_the_other_is_refused_and_the_factors_equal_a_single_fit(project, fitted,
                                                                                                  tmp_path):
    root = tmp_path / "project"
    shutil.copytree(project, root)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    fits = [subprocess.Popen([sys.executable, "-c", WAITING_FIT], cwd=root, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.time() + 300
        while all(f.poll() is None for f in fits) and time.time() < deadline:
            time.sleep(0.1)
        refused = next(f for f in fits if f.poll() is not None)  # the first to end is the one refused
        proceeding = next(f for f in fits if f is not refused)
        _, err = refused.communicate()
        assert refused.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ekfac-influence fit: error: "), err
        assert f"{RUN} is being written by another ekfac-influence fit (pid {proceeding.pid} on host " \
               f"{socket.gethostname()}" in lines[0] and "lock runs/tiny/.fit.lock" in lines[0], lines[0]
        while not (root / "holding").exists() and proceeding.poll() is None and time.time() < deadline:
            time.sleep(0.1)  # the other one reaches the fit itself, holding the lock
        (root / "go").touch()
        out, err = proceeding.communicate(timeout=300)
        assert proceeding.returncode == 0, err[-2000:]
    finally:
        for f in fits:
            if f.poll() is None:
                f.kill()
    assert not (root / RUN / ".fit.lock").exists() and not (root / RUN / ".corpus.lock").exists()
    single = load_file(fitted / RUN / "factors" / "factors.safetensors")
    both = load_file(root / RUN / "factors" / "factors.safetensors")
    assert single.keys() == both.keys()
    for key in single:
        assert (single[key] == both[key]).all(), key


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_is_released_on_an_exception(tmp_path):
    run = tmp_path / "run"
    with stage_lock(run, "fit", command="ekfac-influence fit") as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        child = subprocess.run([sys.executable, "-c", "from ekfac_influence.storage import stage_lock\n"
                                f"with stage_lock({str(run)!r}, 'fit'): pass"],
                               capture_output=True, text=True, timeout=120,
                               env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
        assert child.returncode != 0 and f"pid {os.getpid()} on host" in child.stderr, child.stderr
        with stage_lock(run, "index"):  # another stage of the same run is another writer
            pass
    with pytest.raises(RuntimeError, match="inside"):
        with stage_lock(run, "fit"):
            raise RuntimeError("inside")
    with stage_lock(run, "fit"):  # released by the exception: taken again
        pass
    assert not run.exists()  # made for the lock, removed with it


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is gone (not reused within the test, as pids grow)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".fit.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "earlier"}))
    with stage_lock(run, "fit") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"took over the stale lock {run / '.fit.lock'} of pid {dead.pid}" in capsys.readouterr().out
    assert not (run / ".fit.lock").exists()


def test_a_lock_left_by_another_host_is_refused_naming_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".fit.lock").write_text(json.dumps({"host": "elsewhere", "pid": 4242, "since": "earlier"}))
    with pytest.raises(StorageError, match=r"writer on another host \(pid 4242 on host elsewhere.*remove .*\.fit\.lock"):
        with stage_lock(run, "fit"):
            pass


def test_a_refused_stage_leaves_no_lock_and_no_run_directory(project, tmp_path, capsys):
    root = tmp_path / "project"
    shutil.copytree(project, root)
    before = snapshot(root)
    assert run_main(root, "fit", "--config", "run.yaml", "--quiet", "--model.path", "no_model") == 2
    assert snapshot(root) == before and not (root / "runs").exists()


# ----------------------------------------------------------------------------- the corpus after the fit


def test_factors_of_another_packing_are_used_with_a_note_and_delta_logp_divides_by_the_corpus_scored(fitted, tmp_path,
                                                                                                      capsys):
    """Rebuilding the index with another corpus.length repacks the run's corpus after the fit (legal: G from
    another packing of the same text). The query says so, and delta_logp = score / N with N the sequences
    scored, not those fitted on; the manifests say what each stage read."""
    root = tmp_path / "project"
    shutil.copytree(fitted, root)
    fitted_on = json.loads((root / RUN / "factors" / "manifest.json").read_text())["meta"]["corpus"]
    assert run_main(root, "index", "--config", "run.yaml", "--quiet", "--overwrite", "--corpus.length", "16") == 0
    corpus = json.loads((root / RUN / "corpus" / "manifest.json").read_text())
    assert corpus["num_sequences"] != fitted_on["num_sequences"] and corpus["corpus_id"] != fitted_on["corpus_id"]
    capsys.readouterr()
    assert run_main(root, "query", "--config", "run.yaml", "--quiet") == 0
    out = capsys.readouterr().out
    N = corpus["num_sequences"]
    assert (f"note: the factors were fitted on {fitted_on['num_sequences']} sequences of another corpus "
            f"(id {fitted_on['corpus_id']}); scoring the {N} sequences") in out, out
    manifest = json.loads((root / RUN / "queries" / "first" / "manifest.json").read_text())
    assert manifest["num_train_sequences"] == N and manifest["num_sequences"] == N
    assert manifest["factors_corpus"]["corpus_id"] == fitted_on["corpus_id"]
    for record in map(json.loads, (root / RUN / "queries" / "first" / "topk.jsonl").read_text().splitlines()):
        for hit in record["top_positive"] + record["top_negative"]:
            assert hit["delta_logp"] == pytest.approx(hit["score"] / N, rel=1e-6)
    stages = json.loads((root / RUN / "manifest.json").read_text())["stages"]
    assert stages["fit"]["corpus"]["corpus_id"] == fitted_on["corpus_id"]
    assert stages["index"]["corpus"]["corpus_id"] == stages["query"]["corpus"]["corpus_id"] == corpus["corpus_id"]


# ----------------------------------------------------------------------------- full disks, for real


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at tmp_path/disk (root in a container that may mount), else the test is skipped."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (run the tests as root to check a really full disk)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Take all but about `leave` bytes of the disk's free space."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as handle:
        handle.write(b"\0" * max(free - leave, 0))


def test_a_really_full_disk_while_packing_ends_in_one_line_and_leaves_no_partial_files(project, small_disk, tmp_path,
                                                                                        capsys):
    root = tmp_path / "project"
    shutil.copytree(project, root)
    fill(small_disk, leave=8192)  # the packed corpus's tokens alone take 11 KiB
    before = snapshot(small_disk)
    capsys.readouterr()
    assert run_main(root, "fit", "--config", "run.yaml", "--quiet", "--run", str(small_disk / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and str(small_disk) in err[0], err
    assert "free" in err[0] and "free some space or choose another --run" in err[0], err[0]
    assert snapshot(small_disk) == before  # no run directory, no temporary directory, no lock


def test_a_disk_too_small_for_the_scores_is_refused_before_the_query_writes_anything(fitted, small_disk, tmp_path,
                                                                                        capsys):
    root = tmp_path / "project"
    shutil.copytree(fitted, root)
    run = small_disk / "run"
    shutil.copytree(root / RUN, run)  # fitted on the big disk, answered on the small one
    assert run_main(root, "index", "--config", "run.yaml", "--quiet", "--run", str(run)) == 0
    fill(small_disk, leave=4096)  # one page: the lock file's
    before = snapshot(small_disk)
    capsys.readouterr()
    assert run_main(root, "query", "--config", "run.yaml", "--quiet", "--run", str(run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"No space left on device: the scores file of 2 queries × \d+ sequences needs "
                                       r"[\d.]+ \w+, 0 B free", err[0]), err
    assert snapshot(small_disk) == before


def test_a_scores_file_is_allocated_for_real_so_a_full_disk_fails_at_once_not_with_sigbus(small_disk):
    from ekfac_influence.files import allocate_file

    fill(small_disk, leave=64 * 1024)
    with pytest.raises(OSError) as raised:
        allocate_file(small_disk / "scores.f32", 1 << 20, "the scores file")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(small_disk / "scores.f32")
    assert "the scores file needs 1.0 MiB" in raised.value.strerror
    assert not (small_disk / "scores.f32").exists()
    allocate_file(small_disk / "small.f32", 16 * 1024)
    assert os.stat(small_disk / "small.f32").st_blocks * 512 >= 16 * 1024  # allocated, not sparse
