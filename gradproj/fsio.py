"""File safety, the one owner: atomic writes, modes under the umask, checksums, safetensors
files with one metadata key, flocks, the swap of a directory whole, and the signal guards that
keep a swap from being cut in half.

The formats (run directories in `gradproj.store`, score directories in `gradproj.scoredir`, ...)
are written only through these functions, so every file of every format is replaced atomically
and carries the umask's mode.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from gradproj.errors import Terminated, UserError

METADATA_KEY = "gradproj"  # a safetensors file's one metadata key (see `write_safetensors`)


# --- Modes ---


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path, directory: bool = False) -> None:
    """Give a file (0666) or directory (0777) made private by tempfile the umask's modes."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


# --- Atomic writes ---


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: others could not read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


# --- Output paths, checked before any work ---

# What an output path that exists must be: the atomic writes replace it, so anything else (a FIFO,
# a device) would be replaced by a regular file.
FILE_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def check_output(path: str | Path, option: str, directory: bool = False) -> None:
    """Refuse an output path that exists as something other than what is written there (a
    regular file, or a directory when `directory`), before any work: a write would replace it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing (or unreachable: the write says why)
        return
    wanted = stat.S_IFDIR if directory else stat.S_IFREG
    if stat.S_IFMT(mode) != wanted:
        kind = FILE_KINDS.get(stat.S_IFMT(mode), "a special file")
        raise UserError(
            f"{option} {path} is {kind}, where gradproj writes {FILE_KINDS[wanted]} (it "
            "would replace it); give another path"
        )


def check_writable(folder: Path, what: str, option: str) -> None:
    """Fail before any compute when `folder` cannot be created or written; the error names
    `what` is written there and the `option` that chooses it. Leaves nothing behind: a model
    that then fails to load must not leave empty directories."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(
            f"cannot write {what} ({err.strerror}); choose a writable {option}"
        ) from err
    finally:
        for made in created:  # deepest first
            with contextlib.suppress(OSError):  # e.g. another process's files appeared
                made.rmdir()


# --- Checksums ---


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Checksum of tensor names, dtypes, shapes and bytes, independent of the file header."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --- safetensors files ---


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, info: dict, tmp_prefix: str | None = None
) -> None:
    """Write a safetensors file atomically: into a temporary directory beside `path` (named
    `tmp_prefix`*), fsync, rename over `path`; the file gets the umask's mode.

    `info` becomes the one metadata key, `gradproj` (see `read_metadata`): safetensors keeps
    metadata in a hash map, so several keys would be written in a random order and identical
    contents would differ in their bytes.
    """
    metadata = {METADATA_KEY: json.dumps(info, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = tmp_prefix or f".{path.name}-"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=prefix) as tmpdir:
        tmp = Path(tmpdir) / path.name
        try:
            save_safetensors(tensors, tmp, metadata)
        except OSError as err:  # name the file, not its temporary copy, which is removed
            raise OSError(err.errno, err.strerror, str(path)) from err
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """safetensors' save_file, with the umask's mode, and whose I/O errors (a full disk) become
    the OSError they are."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as err:  # safetensors reports I/O failures as SafetensorError
        code = re.search(r"\(os error (\d+)\)", str(err))  # the Rust std::io::Error's errno
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err
    honour_umask(path)  # safetensors writes through a 0600 temporary file


def read_metadata(f) -> dict:
    """The `gradproj` metadata (a JSON object) of a file opened with `safe_open`; {} if none."""
    return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))


# --- Locks ---


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold an flock on `path` (made, with its folder, if missing) while the block runs: yields
    whether it got it (without `wait`, a lock another process holds is not waited for).

    An flock dies with its holder, so a killed process never blocks the next. Lock files are
    kept, as deleting one that another process has open would let two processes hold "the same"
    lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        kind = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(f.fileno(), kind | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


# --- Making a directory whole ---


def create_dir(out: Path, build: Callable[[Path], None]) -> None:
    """Run `build(new)` in a new directory beside `out`, then rename it to `out`: whoever finds
    `out` finds it whole. When another process made `out` first, theirs is kept and ours is
    dropped (both built the same thing). An error or Ctrl-C removes ours; a process killed
    (SIGKILL) leaves `.<name>.new-*`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        honour_umask(new, directory=True)  # mkdtemp makes 0700: others could not read
        build(new)
        os.rename(new, out)
    except OSError:
        if not out.is_dir():
            raise
    finally:
        shutil.rmtree(new, ignore_errors=True)


# --- Replacing a directory whole ---


def replace_dir(out: Path, build: Callable[[Path], None]) -> None:
    """Run `build(staging)` in a new directory beside `out`, then swap it in for `out`.

    Readers see the old contents or the new, never a mix. Call it under the output's lock,
    after `remove_dead_leftovers(out, ...)` and inside `sigterm_unwinds()`. An error, Ctrl-C or
    SIGTERM removes the staging directory; a process killed (SIGKILL) leaves
    `.<name>.staging-*` (or between the two renames `.<name>.old-*`), which the next writer of
    `out` cleans up.
    """
    staging = None
    try:
        with _signals_held():  # a signal right after mkdtemp would leave it unnamed here
            staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
        honour_umask(staging, directory=True)  # mkdtemp makes 0700
        build(staging)
        with _signals_held():  # between the renames, a signal would leave neither version
            _swap(staging, out)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    old = out.parent / f".{out.name}.old-{staging.name.rsplit('-', 1)[-1]}"
    os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old)


def remove_dead_leftovers(out: Path, is_whole: Callable[[Path], bool]) -> None:
    """Under the output's lock: staging and old directories beside `out` are a dead writer's.
    One killed between its two renames left the previous `out` as `.old-*` and no `out`: that
    previous version is put back when `is_whole` accepts it."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"))
    if not out.exists() and olds and is_whole(olds[-1]):
        os.rename(olds.pop(), out)
    for leftover in [*out.parent.glob(f".{out.name}.staging-*"), *olds]:
        shutil.rmtree(leftover, ignore_errors=True)


# --- Signals ---

# While the main thread holds the signals (below), a SIGTERM sent to the process can still be
# delivered to another thread (torch's, tqdm's), whose handler call then runs in the main
# thread at once: the handler of `sigterm_unwinds` defers it to the end of the held steps.
_held = False
_deferred: list[int] = []


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C while the block runs (so `finally` and `except` clean up)."""

    def stop(signum, frame):
        if _held:  # delivered to another thread while the main thread holds it: wait
            _deferred.append(signum)
            return
        raise Terminated(signum)

    if threading.current_thread() is not threading.main_thread():  # handlers: main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT wait (are delivered on leaving) while a few steps must not be cut."""
    global _held
    outer = _held
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    _held = True
    try:
        yield
    finally:
        _held = outer
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if not outer and _deferred:
        signum = _deferred[0]
        _deferred.clear()
        raise Terminated(signum)
