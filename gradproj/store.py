"""Run directories: atomic safetensors shards, per-task manifest parts, a merged manifest.

A run directory holds `<start>_<end>.safetensors` shards (positions start..end-1 among the rows
the split chose; each example records its row of the split as `index`) and one `manifest.json`.
Each shard carries its own examples, skipped examples and a content checksum in its metadata, so a
shard is self-verifying: a rerun, a job-array task or `--merge` can rebuild the manifest from the
shards alone, and nothing depends on which process wrote what. A process claims a shard (an flock
in `.locks/`) before computing it, so concurrent processes on one run split the work.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gradproj.errors import UserError

MANIFEST = "manifest.json"
SHARD_FORMAT = "gradproj-shard/1"
RUN_FORMAT = "gradproj-run/1"
METADATA_KEY = "gradproj"  # a safetensors file's one metadata key (see `write_safetensors`)
# Manifest fields rebuilt from the shards on every merge; the rest is the run's header.
DERIVED_FIELDS = ("format", "n_examples", "complete", "shards", "examples", "skipped", "rejected")
# Header fields a shard does not carry: they vary between the processes that write one run
# (device, batch size, task range, package versions) and would make equal shards differ.
PROCESS_FIELDS = ("options", "versions")


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path, directory: bool = False) -> None:
    """Give a file (0666) or directory (0777) made private by tempfile the umask's modes."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


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


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


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


def identity_sha256(identity: dict) -> str:
    """The hash of a run's identity (every option that decides its bytes)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def examples_sha256(manifest: dict) -> str:
    """The hash of a run's examples: the (dataset row, id) of each, kept or skipped."""
    held = sorted((e.get("index", -1), e["id"]) for e in manifest["examples"] + manifest["skipped"])
    return hashlib.sha256(json.dumps(held).encode()).hexdigest()


def shards_sha256(manifest: dict) -> str:
    """The hash of a run's listed shards (file names and checksums): it names the stored
    vectors, and, unlike the manifest's own checksum, a merge that rewrites the manifest keeps
    it."""
    listed = [(s["file"], s["sha256"]) for s in manifest["shards"]]
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()


def shard_name(start: int, end: int) -> str:
    return f"{start}_{end}.safetensors"


def shard_span(path: Path) -> tuple[int, int] | None:
    """(start, end) of a file named like a shard, else None."""
    span = re.fullmatch(r"(\d+)_(\d+)\.safetensors", Path(path).name)
    return (int(span[1]), int(span[2])) if span else None


def shard_ranges(start: int, end: int, per_file: int) -> list[tuple[int, int]]:
    """Shard boundaries are multiples of `per_file` in dataset rows, whatever the task range."""
    first = (start // per_file) * per_file
    return [(max(s, start), min(s + per_file, end)) for s in range(first, end, per_file) if s < end]


@dataclass
class ShardRecord:
    """What a shard holds, as written in its metadata: kept examples and skipped ones."""

    examples: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def write_shard(
    run_dir: Path,
    start: int,
    end: int,
    tensors: dict[str, torch.Tensor],
    record: ShardRecord,
    run: dict | None = None,
) -> dict:
    """Write one shard atomically; returns its manifest entry.

    `run` is the run's header (without `PROCESS_FIELDS`) and `n_examples`: with its
    `identity_sha256` a shard says which run it belongs to, and a lost manifest is rebuilt
    from it (`header_from_shards`).
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    info = {
        "format": SHARD_FORMAT,
        "start": start,
        "end": end,
        "examples": record.examples,
        "skipped": record.skipped,
        "content_sha256": content_sha256(tensors),
    }
    if run is not None:
        info["run"] = run
    path = Path(run_dir) / shard_name(start, end)
    # named by the shard: a dead writer's leftover is removed by whoever claims the shard next
    write_safetensors(tensors, path, info, tmp_prefix=f".shard-{start}_{end}-")
    return shard_entry(path, record)


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


def shard_entry(path: Path, record: ShardRecord) -> dict:
    start, end = (int(x) for x in path.name.removesuffix(".safetensors").split("_"))
    return {
        "file": path.name,
        "start": start,
        "end": end,
        "n": len(record.examples),
        "sha256": file_sha256(path),
    }


def read_metadata(f) -> dict:
    """The `gradproj` metadata (a JSON object) of a file opened with `safe_open`; {} if none."""
    return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))


def read_shard_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return read_metadata(f)


def check_shard(path: Path) -> ShardRecord | None:
    """The shard's record if the file parses and its content matches its checksum, else None."""
    try:
        meta, tensors = _read_shard(path)
    except Exception:
        return None
    if meta.get("format") != SHARD_FORMAT or content_sha256(tensors) != meta.get("content_sha256"):
        return None
    return ShardRecord(meta["examples"], meta["skipped"])


def shard_identity(meta: dict) -> str | None:
    """The identity hash a shard's metadata records (None for shards of gradproj < 0.2)."""
    run = meta.get("run")
    return run.get("identity_sha256") if isinstance(run, dict) else None


def shard_problem(
    path: Path, identity: str | None, recorded: str | None, rows: list | None = None
) -> str | None:
    """Why the shard at `path` is not an accepted part of the run, or None: the one test of a
    shard that extract, verify, merge and score share.

    A shard is accepted when it exists and parses, records the run's `identity` (a hash; None
    skips the test, for runs of gradproj < 0.2), matches the checksum the manifest `recorded`
    for it (its whole file) or, when none is recorded, its own content checksum, and holds
    exactly `rows` (its (index, id) pairs, when the caller knows the dataset).
    """
    if not path.is_file():
        return "missing"
    try:
        meta = read_shard_metadata(path)
        held = sorted((e["index"], e["id"]) for e in meta["examples"] + meta["skipped"])
    except Exception:
        return "unreadable (its header or metadata is damaged)"
    if meta.get("format") != SHARD_FORMAT:
        return "not a gradproj shard"
    if identity is not None and shard_identity(meta) != identity:
        if shard_identity(meta) is None:
            return "written by a gradproj that did not record the run of a shard"
        return "made with other options than this run's (its identity hash differs)"
    if recorded is not None:
        if file_sha256(path) != recorded:
            return "its checksum differs from the one manifest.json records"
    elif check_shard(path) is None:
        return "its tensors do not match their checksum"
    if rows is not None and held != sorted(map(tuple, rows)):
        return "holds other examples than the dataset's rows it stands for"
    return None


def _read_shard(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        meta = read_metadata(f)
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return meta, tensors


@dataclass
class Shard:
    """One shard's contents: ids and dataset rows, and vectors (projected) or ragged values."""

    ids: list[str]
    index: torch.Tensor
    vectors: torch.Tensor | None = None
    values: torch.Tensor | None = None
    offsets: torch.Tensor | None = None

    def rows(self, i: int) -> torch.Tensor:
        """The `[length, hidden]` non-zero rows of example i of a full shard."""
        return self.values[self.offsets[i] : self.offsets[i + 1]]


def load_shard(path: Path) -> Shard:
    meta, tensors = _read_shard(path)
    return Shard(ids=[e["id"] for e in meta["examples"]], **tensors)


@dataclass
class VerifyReport:
    """The one definition of a complete run: every expected shard accepted (`shard_problem`)
    and listed in the manifest."""

    complete: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)  # shard -> why
    unlisted: list[str] = field(default_factory=list)  # accepted, but not in manifest.json

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt and not self.unlisted

    def summary(self) -> str:
        parts = [f"{len(self.complete)} complete"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({', '.join(self.missing[:5])})")
        if self.corrupt:
            named = ", ".join(f"{k}: {v}" for k, v in list(self.corrupt.items())[:5])
            parts.append(f"{len(self.corrupt)} corrupt ({named})")
        if self.unlisted:
            parts.append(f"{len(self.unlisted)} not in manifest.json yet")
        return ", ".join(parts)

    def advice(self, path: Path) -> str:
        if self.missing or self.corrupt:
            return "rerun the extraction: it computes the missing and corrupt shards"
        return f"rebuild the manifest: gradproj merge {path}"


def manifest_problem(run_dir: Path) -> str | None:
    """None when the run directory's manifest.json reads, else what is wrong with it."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return f"has no {MANIFEST}"
    try:
        json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"has a {MANIFEST} that is not valid JSON ({err})"
    return None


def shard_files(run_dir: Path) -> list[Path]:
    """The files of a run directory named like shards, in shard order."""
    return sorted((p for p in Path(run_dir).glob("*.safetensors") if shard_span(p)), key=shard_span)


class Run:
    """Reader of a finished (or partial) run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        problem = manifest_problem(self.path)
        if problem is not None and shard_files(self.path):
            raise UserError(
                f"{self.path} {problem}; rebuild it from the metadata of its "
                f"{len(shard_files(self.path))} shard(s): gradproj merge {self.path}"
            )
        if problem is not None and problem.startswith("has no"):
            raise UserError(
                f"{self.path} is not a gradient run (no {MANIFEST}); "
                "pass a directory written by gradproj extract (extract_gradients.py)"
            )
        if problem is not None:
            raise UserError(f"{self.path} {problem}, and no shards; rerun the extraction")
        self.manifest = json.loads((self.path / MANIFEST).read_text())

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.manifest["examples"]]

    @property
    def skipped(self) -> list[dict]:
        return self.manifest["skipped"]

    def expected_shards(self) -> list[str]:
        per_file = self.manifest["shard_size"]
        return [shard_name(s, e) for s, e in shard_ranges(0, self.manifest["n_examples"], per_file)]

    def verify(self) -> VerifyReport:
        recorded = {s["file"]: s["sha256"] for s in self.manifest["shards"]}
        recorded |= {s["file"]: s["sha256"] for s in self.manifest.get("rejected", [])}
        listed = {s["file"] for s in self.manifest["shards"]}
        identity = self.manifest.get("identity_sha256")
        report = VerifyReport()
        for name in self.expected_shards():
            problem = shard_problem(self.path / name, identity, recorded.get(name))
            if problem == "missing":
                report.missing.append(name)
            elif problem is not None:
                report.corrupt[name] = problem
            elif name not in listed:
                report.unlisted.append(name)
            else:
                report.complete.append(name)
        return report

    def require_complete(self) -> None:
        report = self.verify()
        if not report.ok:
            raise UserError(
                f"run {self.path} is incomplete: {report.summary()}; {report.advice(self.path)}"
            )
        if not self.manifest["examples"]:
            raise UserError(f"run {self.path} holds no gradients (every example was skipped)")

    def iter_shards(self) -> Iterator[Shard]:
        for entry in self.manifest["shards"]:
            yield load_shard(self.path / entry["file"])

    def load_matrix(self) -> tuple[list[str], torch.Tensor]:
        """All vectors of a projected (or params_full) run as one fp32 `[n, k]` matrix."""
        if self.kind not in ("projected", "params_full", "hidden"):
            raise UserError(f"{self.path} holds {self.kind} gradients; load_matrix needs projected")
        ids, blocks = [], []
        for shard in self.iter_shards():
            ids += shard.ids
            blocks.append(shard.vectors.float())
        return ids, torch.cat(blocks) if blocks else torch.zeros(0, 0)

    def stored_rows(self) -> tuple[bool, int, int]:
        """(ragged, bytes per element, row width) of what the run's shards store: ragged
        `values` rows of `hidden`, or one `vectors` row of `k` per example."""
        with safe_open(str(self.path / self.manifest["shards"][0]["file"]), framework="pt") as f:
            ragged = "values" in f.keys()  # noqa: SIM118
            rows = f.get_slice("values" if ragged else "vectors")
            return ragged, DTYPE_BYTES[rows.get_dtype()], rows.get_shape()[1]

    def longest_example(self) -> int:
        """The most stored positions of any example of a full run, from its shards' offsets."""
        longest = 0
        for entry in self.manifest["shards"]:
            with safe_open(str(self.path / entry["file"]), framework="pt") as f:
                offsets = f.get_tensor("offsets")
            if len(offsets) > 1:
                longest = max(longest, int((offsets[1:] - offsets[:-1]).max()))
        return longest

    def dense_vector(self, i: int) -> torch.Tensor:
        """Example i (in manifest order) as the dense fp32 `[max_seq_length * hidden]` vector."""
        shard_file, j = self._locate(i)
        shard = load_shard(self.path / shard_file)
        if shard.vectors is not None:
            return shard.vectors[j].float()
        rows = shard.rows(j).float()
        dense = torch.zeros(self.manifest["max_seq_length"], rows.shape[1])
        dense[: rows.shape[0]] = rows
        return dense.flatten()

    def _locate(self, i: int) -> tuple[str, int]:
        for entry in self.manifest["shards"]:
            if i < entry["n"]:
                return entry["file"], i
            i -= entry["n"]
        raise IndexError(f"example {i} out of range")


def check_writable(run_dir: Path) -> None:
    """Fail before any compute when a run directory cannot be created or written. Leaves
    nothing behind: a model that then fails to load must not leave empty run directories."""
    run_dir = Path(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise UserError(
            f"cannot write the output directory {run_dir} ({err.strerror}); choose a writable "
            "--gradients_output_path"
        ) from err
    finally:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):  # e.g. another task's shards appeared
                folder.rmdir()


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


@contextlib.contextmanager
def claim_shard(run_dirs: list[Path], start: int, end: int, wait: bool) -> Iterator[bool]:
    """Claim a shard for this process across its run directories: yields whether it got it.

    The claim is a `file_lock` on `.locks/<shard>.lock` in each directory.
    """
    with contextlib.ExitStack() as stack:
        for run_dir in sorted(map(Path, run_dirs)):  # one order for all: waiting cannot deadlock
            lock = Path(run_dir) / ".locks" / f"{start}_{end}.lock"
            if not stack.enter_context(file_lock(lock, wait=wait)):
                yield False
                return
        yield True


def remove_leftovers(run_dir: Path) -> None:
    """Remove the temporary shard directories of writers killed mid-write (SIGKILL, OOM).

    A writer holds its shard's claim while its temporary directory exists, so a directory
    whose shard can be claimed belongs to a dead process.
    """
    for leftover in Path(run_dir).glob(".shard-*"):
        span = re.fullmatch(r"\.shard-(\d+)_(\d+)-.*", leftover.name)
        if span is None:
            continue
        with claim_shard([run_dir], int(span[1]), int(span[2]), wait=False) as claimed:
            if claimed:
                shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Serialises manifest merges of concurrent job-array tasks writing one run directory."""
    with file_lock(Path(run_dir) / ".lock"):
        yield


def merge_manifest(
    run_dir: Path,
    header: dict,
    n_examples: int,
    per_file: int,
    fresh: dict[str, dict],
    check: bool = False,
) -> dict:
    """Rebuild manifest.json from the shards present.

    `fresh` holds the entries of shards this process just wrote. Other shards are accepted by
    `shard_problem` against the checksum already recorded (or their own, if never recorded: a
    task preempted between writing a shard and merging); without `check`, a shard the manifest
    already lists is only checked for its identity, not read whole (an extraction checked
    every shard when it began). A shard not accepted is listed under "rejected", with why.
    """
    run_dir = Path(run_dir)
    identity = header.get("identity_sha256")
    with run_lock(run_dir):
        path = run_dir / MANIFEST
        for leftover in run_dir.glob(f".{MANIFEST}.*.tmp"):  # of a merge killed mid-write
            leftover.unlink(missing_ok=True)
        listed, rejected = _recorded_entries(path)
        listed.update(fresh)
        shards, examples, skipped, refused = [], [], [], []
        for start, end in shard_ranges(0, n_examples, per_file):
            name = shard_name(start, end)
            if not (run_dir / name).is_file():
                continue
            trusted = name in listed and not check
            entry = listed.get(name) or rejected.get(name)
            problem, record = _accept(run_dir / name, identity, entry, trusted or name in fresh)
            if problem is not None:
                sha = entry["sha256"] if entry else None
                refused.append({"file": name, "sha256": sha, "reason": problem})
                continue
            shards.append(listed.get(name) or shard_entry(run_dir / name, record))
            examples += record.examples
            skipped += record.skipped
        manifest = {
            "format": RUN_FORMAT,
            **header,
            "n_examples": n_examples,
            "complete": len(shards) == len(shard_ranges(0, n_examples, per_file)),
            "shards": shards,
            "examples": examples,
            "skipped": skipped,
        }
        if refused:
            manifest["rejected"] = refused
        atomic_write_json(path, manifest)
    return manifest


def _recorded_entries(path: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """The listed and the rejected shard entries of a manifest ({} when it cannot be read)."""
    try:
        manifest = json.loads(path.read_text())
        listed = {s["file"]: s for s in manifest["shards"]}
        rejected = {s["file"]: s for s in manifest.get("rejected", []) if s.get("sha256")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}, {}
    return listed, rejected


def _accept(path: Path, identity, entry: dict | None, trusted: bool):
    """(None, record) for an accepted shard, else (why, None); `trusted`: its checksum was
    recorded by a check already made, so only its identity is read."""
    if not trusted:
        problem = shard_problem(path, identity, entry["sha256"] if entry else None)
        if problem is not None:
            return problem, None
    try:
        meta = read_shard_metadata(path)
        record = ShardRecord(meta["examples"], meta["skipped"])
    except Exception:
        return "unreadable (its header or metadata is damaged)", None
    if identity is not None and shard_identity(meta) != identity:
        return "made with other options than this run's (its identity hash differs)", None
    return None, record


def header_from_shards(run_dir: Path) -> tuple[dict, int]:
    """A run's header and example count, read from its shards' metadata (the manifest lost).

    Refuses shards that disagree on the run they belong to: which to keep is the user's call.
    """
    runs = {}
    for path in shard_files(run_dir):
        with contextlib.suppress(Exception):
            run = read_shard_metadata(path).get("run")
            if isinstance(run, dict) and run.get("identity_sha256"):
                runs.setdefault(run["identity_sha256"], []).append(path.name)
                header = run
    if not runs:
        raise UserError(
            f"{run_dir}: no readable shard records its run (shards written by gradproj < 0.2, "
            "or damaged); rerun the extraction"
        )
    if len(runs) > 1:
        groups = "; ".join(f"{', '.join(names[:3])}" for names in runs.values())
        raise UserError(
            f"{run_dir}: its shards were made by {len(runs)} runs with different options "
            f"({groups}); delete the shards of the run you do not want, or rerun the extraction "
            "into a new --gradients_output_path"
        )
    header = dict(header)
    return header, header.pop("n_examples")


def recorded_checksums(run_dir: Path) -> dict[str, str]:
    """The sha256 that manifest.json records per shard, listed or rejected (empty without a
    readable manifest)."""
    listed, rejected = _recorded_entries(Path(run_dir) / MANIFEST)
    return {name: s["sha256"] for name, s in (rejected | listed).items()}


# --- The tensors of a shard ---
#
# A shard holds `index` (int64 [n], each example's row of the split) and either `vectors`
# ([n, width]: projections, parameter gradients, hidden states) or the ragged `values`
# ([sum of lengths, width]) with `offsets` (int64 [n + 1]) of full embedding gradients.


def shard_tensors(
    data: torch.Tensor | list[torch.Tensor], index: list[int], dtype: torch.dtype, width: int
) -> dict[str, torch.Tensor]:
    """A shard's tensors from a `[n, width]` matrix or a list of ragged `[length, width]` rows."""
    index = torch.tensor(index, dtype=torch.long)
    if isinstance(data, torch.Tensor):
        return {"vectors": data.to(dtype), "index": index}
    values = torch.cat(data) if data else torch.zeros(0, width)
    lengths = torch.tensor([0] + [rows.shape[0] for rows in data], dtype=torch.long)
    return {"values": values.to(dtype), "offsets": torch.cumsum(lengths, 0), "index": index}


def mean_tensors(data: torch.Tensor | list[torch.Tensor], dtype: torch.dtype) -> dict:
    """The shard of `--mode store_mean`: the fp64 mean of the examples, stored as one example
    (ragged rows are zero past each example's length)."""
    index = torch.zeros(1, dtype=torch.long)
    if isinstance(data, torch.Tensor):
        return {"vectors": data.double().mean(0, keepdim=True).to(dtype), "index": index}
    longest = max(rows.shape[0] for rows in data)
    total = torch.zeros(longest, data[0].shape[1], dtype=torch.float64)
    for rows in data:
        total[: rows.shape[0]] += rows.double()
    values = (total / len(data)).to(dtype)
    return {"values": values, "offsets": torch.tensor([0, longest]), "index": index}


def stored_norm(tensors: dict[str, torch.Tensor]) -> float:
    """The norm of what a shard stores (its `vectors` or `values`), in fp64."""
    return float(tensors.get("vectors", tensors.get("values")).double().norm())


# --- Reading a run in bounded blocks (used by gradproj.influence) ---

# Bytes per element of each safetensors dtype that runs hold (`get_slice(...).get_dtype()`)
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}


def iter_blocks(run: Run, max_bytes: int) -> Iterator[Shard]:
    """A run's examples in manifest order, as `Shard`s of whole examples of about `max_bytes`.

    Slices are read through safetensors' lazy slicing, so a shard larger than memory is never
    loaded whole; a block holds at least one example, however large. Full blocks carry offsets
    that start at 0.
    """
    for entry in run.manifest["shards"]:
        with safe_open(str(run.path / entry["file"]), framework="pt") as f:
            meta = read_metadata(f)
            ids = [e["id"] for e in meta["examples"]]
            index = f.get_tensor("index")
            if "vectors" in f.keys():  # noqa: SIM118
                yield from _vector_blocks(f.get_slice("vectors"), ids, index, max_bytes)
            else:
                offsets = f.get_tensor("offsets")
                yield from _ragged_blocks(f.get_slice("values"), offsets, ids, index, max_bytes)


def _vector_blocks(vectors, ids: list[str], index: torch.Tensor, max_bytes: int):
    n, k = vectors.get_shape()
    step = max(1, max_bytes // max(1, k * DTYPE_BYTES[vectors.get_dtype()]))
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        yield Shard(ids=ids[i0:i1], index=index[i0:i1], vectors=vectors[i0:i1])


def _ragged_blocks(values, offsets: torch.Tensor, ids: list[str], index, max_bytes: int):
    _, hidden = values.get_shape()
    row_bytes = hidden * DTYPE_BYTES[values.get_dtype()]
    bounds = offsets.tolist()
    i0 = 0
    while i0 < len(ids):
        i1 = i0 + 1  # one example even when it alone exceeds the budget
        while i1 < len(ids) and (bounds[i1 + 1] - bounds[i0]) * row_bytes <= max_bytes:
            i1 += 1
        rows = values[bounds[i0] : bounds[i1]]
        yield Shard(
            ids=ids[i0:i1],
            index=index[i0:i1],
            values=rows,
            offsets=offsets[i0 : i1 + 1] - bounds[i0],
        )
        i0 = i1
