"""Run directories: safetensors + JSON manifests, atomic writes, checksums. No pickle anywhere.

A stage directory is written under a temporary name and renamed into place, so a reader sees either
nothing or the whole stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save_file as _save_file

from . import distributed
from .files import atomic_write_text, file_mode, temporary_directory

__all__ = ["StorageError", "atomic_write_text", "PassCheckpoint", "read_manifest", "read_shard_files", "read_stage",
           "replace_directory", "sha256_file", "shard_file", "staged_directory", "write_sharded_stage", "write_stage"]

FACTORS_FILE = "factors.safetensors"
MANIFEST_FILE = "manifest.json"


def save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
    """safetensors' save_file, then the mode `open()` would have given the file (it writes 0600)."""
    _save_file(tensors, path)
    os.chmod(path, file_mode())


class StorageError(RuntimeError):
    """A stored result is missing, corrupted, or would be overwritten."""


def replace_directory(tmp: Path, path: Path) -> None:
    """Put the finished directory `tmp` in place of `path`: renames only, so `path` is never half-written.

    An existing `path` is moved aside first and removed after the swap.
    """
    if not path.exists():
        os.replace(tmp, path)
        return
    backup = path.with_name(f".{path.name}.old")
    shutil.rmtree(backup, ignore_errors=True)
    os.replace(path, backup)
    os.replace(tmp, path)
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(path, *, overwrite: bool, error: type[Exception] = StorageError):
    """Yield a temporary directory beside `path`; when the block ends without error, it becomes `path`.

    Refuses an existing `path` without `overwrite`. On failure nothing is left behind: not the
    temporary directory, nor the parent directories that were made for it.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise error(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    created = [parent for parent in [path.parent, *path.parent.parents] if not parent.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_directory(path.parent, path.name)
    finished = False
    try:
        yield tmp
        replace_directory(tmp, path)
        finished = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not finished:
            for directory in created:
                if directory.exists() and not any(directory.iterdir()):
                    directory.rmdir()


@contextlib.contextmanager
def stage_lock(directory, stage: str, *, command: str | None = None):
    """Hold `<directory>/.<stage>.lock` while the block runs: one writer per run directory and stage.

    The lock is an exclusive `fcntl.flock` on that file, which the kernel drops when its holder
    exits however it exits (an exception, a kill), and the file names the holder (host, pid, when,
    what). A second writer is refused with a StorageError naming the holder. A file left by a holder
    that died (its pid gone on this host) is taken over with a note; one left by another host is
    refused, naming it (its process cannot be checked from here). The file is removed on release, and
    so are the directories made for it when they stay empty. Readers take no lock.
    """
    import fcntl
    import socket

    directory = Path(directory)
    path = directory / f".{stage}.lock"
    created = [parent for parent in [directory, *directory.parents] if not parent.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    host, pid = socket.gethostname(), os.getpid()
    fd = None
    try:
        while fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(path)
                os.close(fd)
                fd = None
                raise StorageError(f"{directory} is being written by another {holder.get('command') or stage} "
                                   f"({_describe_holder(holder)}; lock {path}): wait for it to finish, or use another "
                                   f"--run") from None
            if not path.exists() or os.stat(path).st_ino != os.fstat(fd).st_ino:  # released and removed meanwhile
                os.close(fd)
                fd = None
        holder = _lock_holder(path)
        if holder.get("pid") not in (None, pid) and holder.get("host") != host:
            raise StorageError(f"{path} names a writer on another host ({_describe_holder(holder)}) that this "
                               f"host cannot check; if it is no longer running, remove {path} and rerun")
        try:
            if holder.get("pid") not in (None, pid):
                distributed.print0(f"note: took over the stale lock {path} of pid {holder['pid']} (no such process "
                                   f"on {host}; started {holder.get('since', '?')})")
            record = json.dumps({"host": host, "pid": pid, "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "command": command or stage}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)  # a full disk fails here, before the stage: the lock goes with it
            os.fsync(fd)
            yield path
        finally:
            path.unlink(missing_ok=True)  # while still holding it: a waiting writer sees the new inode (above)
    finally:
        if fd is not None:
            os.close(fd)
        for parent in created:
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()


def _lock_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe_holder(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_stage(path, tensors: dict[str, torch.Tensor], manifest: dict, *, overwrite: bool) -> None:
    """Write `tensors` (safetensors) and `manifest` (JSON, with the tensors' checksum) atomically."""
    with staged_directory(path, overwrite=overwrite) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / FACTORS_FILE))
        manifest = dict(manifest, checksums={FACTORS_FILE: sha256_file(tmp / FACTORS_FILE)})
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def read_stage(path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    manifest = read_manifest(path)
    return read_shard_files(path, manifest, [FACTORS_FILE]), manifest


def read_manifest(path) -> dict:
    """The manifest of a finished stage directory (one tensor file, or one per shard)."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.exists():
        raise StorageError(f"{manifest_path} is missing; is {path} a finished factors directory?")
    try:
        return json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise StorageError(f"{manifest_path} is not valid JSON ({error}); the file is corrupted") from None


def read_shard_files(path, manifest: dict, files: list[str], keep=None) -> dict[str, torch.Tensor]:
    """The tensors of `files` in the stage directory `path`, each checked against the manifest's checksum.

    keep: a predicate on tensor names; only those tensors are read into memory (the checksum still
    covers the whole file, read in chunks).
    """
    path, tensors = Path(path), {}
    for name in files:
        tensor_path = path / name
        if not tensor_path.exists():
            raise StorageError(f"{tensor_path} is missing; is {path} a finished factors directory? (a sharded "
                               f"directory needs every file its manifest lists)")
        expected = manifest.get("checksums", {}).get(name)
        if expected is None:
            raise StorageError(f"{path / MANIFEST_FILE} has no checksum for {name}; the manifest is incomplete or corrupted")
        if sha256_file(tensor_path) != expected:
            raise StorageError(f"{tensor_path} does not match the checksum in its manifest; the file is corrupted: "
                               f"compute it again (e.g. ekfac-influence fit --overwrite)")
        if keep is None:
            tensors.update(load_file(str(tensor_path)))
            continue
        with safe_open(str(tensor_path), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys() if keep(key)})
    return tensors


def shard_file(rank: int, world: int) -> str:
    """The tensor file of process `rank`'s shard: factors.00001-of-00004.safetensors."""
    return f"factors.{rank:05d}-of-{world:05d}.safetensors"


def write_sharded_stage(path, tensors: dict[str, torch.Tensor], manifest: dict, *, overwrite: bool) -> None:
    """Every process writes its own `tensors` as one shard (`shard_file`); the main process adds `manifest`
    (with the number of shards, "shards", and every shard's checksum, "checksums") and renames the
    directory into place. Collective: every
    process calls it; a failure on any process (a full disk) is raised on all, and nothing is left.
    """
    path, rank, world = Path(path), distributed.rank(), distributed.world()
    status = None
    if rank == 0:
        if path.exists() and not overwrite:
            status = ("error", f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            status = ("ok", str(temporary_directory(path.parent, path.name)))
    kind, value = distributed.broadcast_object(status)
    if kind == "error":
        raise StorageError(value)
    tmp, name = Path(value), shard_file(rank, world)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
        local = (name, sha256_file(tmp / name), None)
    except OSError as error:
        local = (name, None, f"{error.strerror or error} ({tmp / name})")
    written = distributed.gather_by_key({rank: local})
    failed = [message for _, _, message in written.values() if message is not None]
    try:
        if failed:
            raise OSError(f"writing a shard failed: {failed[0]}")
        if rank == 0:
            checksums = {file: digest for file, digest, _ in written.values()}
            (tmp / MANIFEST_FILE).write_text(json.dumps(dict(manifest, shards=world, checksums=checksums), indent=2,
                                                        sort_keys=True))
            replace_directory(tmp, path)
    finally:
        distributed.barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)


class PassCheckpoint:
    """Partial sums of the passes over the training data, so an interrupted fit resumes where it was.

    Each process saves its own local sums with the index of the next batch to read (the sums stay
    local until the pass's one reduce, so a resumed run must use the same number of processes; `key`
    holds that and everything else the sums depend on). A pass's reduced result is saved as
    "<pass>.done" by the main process. Saves are atomic; a stale checkpoint (another key) is ignored.
    """

    def __init__(self, directory, key: dict, *, every_batches: int | None = None, every_seconds: float = 300.0):
        self.directory = Path(directory)
        self.key = json.loads(json.dumps(dict(key, world=distributed.world()), sort_keys=True, default=str))
        self.rank = distributed.rank()
        self.every_batches, self.every_seconds = every_batches, every_seconds
        self._last = time.monotonic()

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, meta) saved under `name` by this process (or by the main one for "*.done")."""
        meta_path = self._stem(name).with_suffix(self._stem(name).suffix + ".json")
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        tensor_path = self.directory / str(meta.get("file"))
        if meta.get("key") != self.key or not tensor_path.is_file() or meta.get("sha256") != sha256_file(tensor_path):
            return None
        return load_file(str(tensor_path)), meta

    def save(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Write the tensors to a new file, then point the JSON at it (one atomic rename commits both).

        The previous tensor file is removed only after that, so a kill at any moment leaves a JSON
        that names a complete file with its checksum: the last save, or the one before.
        """
        if name.endswith(".done") and self.rank != 0:
            return
        stem = self._stem(name)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = stem.with_suffix(stem.suffix + ".safetensors.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        digest = sha256_file(tmp)
        tensor_path = stem.with_suffix(f"{stem.suffix}.{digest[:16]}.safetensors")
        os.replace(tmp, tensor_path)
        atomic_write_text(stem.with_suffix(stem.suffix + ".json"),
                          json.dumps(dict(meta, key=self.key, sha256=digest, file=tensor_path.name)))
        for old in self.directory.glob(f"{stem.name}.*.safetensors"):
            if old != tensor_path:
                old.unlink(missing_ok=True)
        self._last = time.monotonic()

    def _stem(self, name: str) -> Path:
        return self.directory / (name if name.endswith(".done") else f"{name}.rank{self.rank}")

    def child(self, name: str) -> "PassCheckpoint":
        """The same checkpoint, kept in a subdirectory (one per group of layers)."""
        other = PassCheckpoint.__new__(PassCheckpoint)
        other.__dict__.update(self.__dict__, directory=self.directory / name)
        return other

    def due(self, batches_done: int) -> bool:
        if self.every_batches is not None:
            return batches_done % self.every_batches == 0
        return time.monotonic() - self._last >= self.every_seconds

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
