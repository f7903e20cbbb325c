"""The one home of the file helpers every package shares: atomic writes, atomic folder swaps,
staging copies, writer locks and checksums.

Every file fastattr writes goes through a temporary file in the same directory followed by
``os.replace``, so a killed job never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, TypeVar

__all__ = ["atomic_dir", "atomic_open", "atomic_path", "atomic_write_bytes", "atomic_write_text", "changed_files",
           "link_tree", "map_npy", "sha256_file", "writer_lock"]

T = TypeVar("T")
log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling file name (for libraries that write by name); renamed over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes 0600 files: keep the replaced file's mode, else the usual 0644.
    os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path``; rename it over ``path`` only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def map_npy(path: str | os.PathLike, scattered: bool = False):
    """A read-only memory map of an ``.npy`` file. ``scattered``: advised for reads of a few rows here
    and there (MADV_RANDOM), without the kernel's readahead around each (128 KB or more): on 1M x 768
    float32 vectors, re-ranking the candidates of 300 queries pulled the whole 3 GB file into memory."""
    import mmap

    import numpy as np

    if not scattered:
        return np.load(path, mmap_mode="r")
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        offset = f.tell()
    if hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    return np.ndarray(shape, dtype, buffer=mapped, offset=offset, order="F" if fortran else "C")


def changed_files(root: Path, recorded: dict[str, str]) -> list[tuple[str, str]]:
    """(relative path, "missing" or "changed") for every file that no longer matches its recorded
    sha256: the one check behind `fastattr index verify` and the sandbox's own verification."""
    out = []
    for rel, expected in recorded.items():
        path = root / rel
        if not path.is_file():
            out.append((rel, "missing"))
        elif sha256_file(path) != expected:
            out.append((rel, "changed"))
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):  # one atomic step: readers see the old folder or the new, never none
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # no atomic exchange here: a crash between the renames leaves the old folder at ``old``
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike, keep: bool = True) -> Iterator[None]:
    """Hold the exclusive lock of ``path``'s writers: ``.<name>.lock`` beside it (the folder itself is
    replaced by each change). Without it, two writers would each stage from the same state and the
    last swap would silently undo the other's change, an opt-out above all. The kernel releases the
    lock when its process dies, so a killed writer never leaves it held; what it left of an
    ``atomic_dir`` change is cleaned up by the next one to hold the lock (no live writer is staging).
    ``keep`` false (a build, which only has to keep a second build of the same folder out, and finds
    the folder there once it holds the lock) removes the lock file when done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another fastattr command is changing it; waiting for it to finish", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        old = path.with_name(f".{path.name}.old")
        if old.is_dir() and not path.exists():  # killed between atomic_dir's two renames: the old folder stands
            os.replace(old, path)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # killed while staging
            shutil.rmtree(stale, ignore_errors=True)
        yield
        if not keep:
            lock.unlink(missing_ok=True)


@contextlib.contextmanager
def claim(path: str | os.PathLike) -> Iterator[bool]:
    """Try to take one job of a queue that several processes share: an exclusive lock on ``path``,
    True while this process holds it, False when another does. Workers that claim each job before
    starting it share out whatever is pending at any moment, however many there are and whenever
    they start; the kernel frees a killed worker's claim."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def claimed(tasks: Iterable[T], lock_path: Callable[[T], Path], finished: Callable[[T], bool]) -> Iterator[T]:
    """The ``tasks`` this process claims (``claim`` on ``lock_path(task)``) and finds not ``finished``
    once it holds the claim, each yielded while the claim is held: the loop body over them is the
    work, and nothing another process holds or has finished is done twice."""
    for task in tasks:
        with claim(lock_path(task)) as mine:
            if mine and not finished(task):
                yield task


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # e.g. a file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def link_tree(source: Path, target: Path, copy: tuple[str, ...] = ()) -> None:
    """Fill ``target`` with hard links to the files of ``source`` (a cheap staging copy: fastattr
    never changes a file in place, it replaces it), real copies for the names in ``copy`` (files
    the caller will modify in place, e.g. a SQLite store)."""
    for path in source.rglob("*"):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.name in copy:
            shutil.copy2(path, dest)
            continue
        try:
            os.link(path, dest)
        except OSError:  # a file system without hard links
            shutil.copy2(path, dest)
