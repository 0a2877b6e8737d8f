"""Files and directories written the way the user's other tools write them: atomically, with the umask.

`tempfile.mkstemp` and `mkdtemp` create 0600 files and 0700 directories whatever the umask says,
which leaves a run unreadable to the rest of a group on a shared cluster file system. Everything
the package writes through a temporary name gets `0666 & ~umask` (files) or `0777 & ~umask`
(directories) before it is renamed into place, as `open()` and `mkdir()` would have given it.
Standard library only, so that the torch-free modules (report, shortlist) use it too.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def directory_mode() -> int:
    return 0o777 & ~current_umask()


def temporary_directory(parent: Path, name: str) -> Path:
    """An empty directory `.<name>.*.tmp` in `parent` with the mode `mkdir` would give it."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp"))
    os.chmod(tmp, directory_mode())
    return tmp


def atomic_write_text(path, text: str) -> None:
    """Write `text` (UTF-8, newlines as given) under a temporary name, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NotTextError(ValueError):
    """A file meant as UTF-8 text holds other bytes; the message names the file and the byte offset."""


def read_utf8(path, what: str = "file") -> str:
    """The file's text, or one line naming the file and the offset of the first byte that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise NotTextError(f"{what} {path} is not UTF-8 text: byte 0x{data[error.start]:02x} at offset {error.start} "
                           f"(line {line}); save it as UTF-8") from None


def size_text(num_bytes: float) -> str:
    """1.5 GiB, 12.0 MiB, 512 B: a size as a person reads it."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{int(num_bytes)} B"


def free_space(path) -> int:
    """Bytes free to this user on the file system that holds `path` (or its nearest existing parent)."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def ensure_space(path, needed: int, what: str) -> None:
    """Refuse, before writing anything, a write of `needed` bytes at `path` that the file system cannot hold.

    Raises OSError(ENOSPC) naming the path, what needs the space, how much, and how much is free.
    """
    free = free_space(path)
    if needed > free:
        raise OSError(errno.ENOSPC, f"No space left on device: {what} needs {size_text(needed)}, "
                                    f"{size_text(free)} free", str(path))


def allocate_file(path, size: int, what: str = "the file") -> None:
    """Create `path` with `size` bytes really allocated (posix_fallocate), so that writing it through a memory map
    cannot die of SIGBUS on a full disk. A file system without fallocate gets a sparse file. On failure nothing is
    left: the half-made file is removed and the OSError names the path and the size."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, file_mode())
    try:
        try:
            if not hasattr(os, "posix_fallocate"):
                raise OSError(errno.EOPNOTSUPP, "no posix_fallocate")
            os.posix_fallocate(fd, 0, size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise OSError(error.errno, f"{error.strerror}: {what} needs {size_text(size)}, "
                                           f"{size_text(free_space(path))} free", str(path)) from None
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
