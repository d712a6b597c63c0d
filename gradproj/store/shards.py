"""A shard of a run directory: its name and span, its tensors, its metadata (the run it belongs
to, its examples, a content checksum), the one test of whether a run accepts it, and the claim a
process holds while computing it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from gradproj import fsio

MANIFEST = "manifest.json"
SHARD_FORMAT = "gradproj-shard/1"
RUN_FORMAT = "gradproj-run/1"
# Manifest fields rebuilt from the shards on every merge; the rest is the run's header.
DERIVED_FIELDS = ("format", "n_examples", "complete", "shards", "examples", "skipped", "rejected")
# Header fields a shard does not carry: they vary between the processes that write one run
# (device, batch size, task range, package versions) and would make equal shards differ.
PROCESS_FIELDS = ("options", "versions")


def options_sha256(identity: dict) -> str:
    """The hash of the options that decide a run's bytes (its manifest's `identity`, with the
    output's name): the run and each of its shards record it as `identity_sha256`."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


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
        "content_sha256": fsio.content_sha256(tensors),
    }
    if run is not None:
        info["run"] = run
    path = Path(run_dir) / shard_name(start, end)
    # named by the shard: a dead writer's leftover is removed by whoever claims the shard next
    fsio.write_safetensors(tensors, path, info, tmp_prefix=f".shard-{start}_{end}-")
    return shard_entry(path, record)


def shard_entry(path: Path, record: ShardRecord) -> dict:
    start, end = (int(x) for x in path.name.removesuffix(".safetensors").split("_"))
    return {
        "file": path.name,
        "start": start,
        "end": end,
        "n": len(record.examples),
        "sha256": fsio.file_sha256(path),
    }


def read_shard_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return fsio.read_metadata(f)


def check_shard(path: Path) -> ShardRecord | None:
    """The shard's record if the file parses and its content matches its checksum, else None."""
    try:
        meta, tensors = _read_shard(path)
    except Exception:
        return None
    intact = fsio.content_sha256(tensors) == meta.get("content_sha256")
    if meta.get("format") != SHARD_FORMAT or not intact:
        return None
    return ShardRecord(meta["examples"], meta["skipped"])


def shard_options_sha256(meta: dict) -> str | None:
    """The `options_sha256` a shard's metadata records as `identity_sha256` (None for shards
    of gradproj < 0.2)."""
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
    if identity is not None and shard_options_sha256(meta) != identity:
        if shard_options_sha256(meta) is None:
            return "written by a gradproj that did not record the run of a shard"
        return "made with other options than this run's (its identity hash differs)"
    if recorded is not None:
        if fsio.file_sha256(path) != recorded:
            return "its checksum differs from the one manifest.json records"
    elif check_shard(path) is None:
        return "its tensors do not match their checksum"
    if rows is not None and held != sorted(map(tuple, rows)):
        return "holds other examples than the dataset's rows it stands for"
    return None


def _read_shard(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        meta = fsio.read_metadata(f)
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


@contextlib.contextmanager
def claim_shard(run_dirs: list[Path], start: int, end: int, wait: bool) -> Iterator[bool]:
    """Claim a shard for this process across its run directories: yields whether it got it.

    The claim is a `fsio.file_lock` on `.locks/<shard>.lock` in each directory.
    """
    with contextlib.ExitStack() as stack:
        for run_dir in sorted(map(Path, run_dirs)):  # one order for all: waiting cannot deadlock
            lock = Path(run_dir) / ".locks" / f"{start}_{end}.lock"
            if not stack.enter_context(fsio.file_lock(lock, wait=wait)):
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
