"""Merging a run directory's manifest from the shards present: after each shard a process
writes, after job-array tasks, and when the manifest was lost (`header_from_shards`); `gradproj
merge` (`merge_run`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from gradproj import fsio
from gradproj.errors import UserError
from gradproj.store.manifest import Manifest
from gradproj.store.run import Run, manifest_problem, shard_files
from gradproj.store.shards import (
    MANIFEST,
    ShardRecord,
    read_shard_metadata,
    shard_entry,
    shard_name,
    shard_options_sha256,
    shard_problem,
    shard_ranges,
)
from gradproj.store.verify import run_dirs_below, verify_one


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Serialises manifest merges of concurrent job-array tasks writing one run directory."""
    with fsio.file_lock(Path(run_dir) / ".lock"):
        yield


def merge_manifest(
    run_dir: Path,
    header: dict,
    n_examples: int,
    per_file: int,
    fresh: dict[str, dict],
    check: bool = False,
) -> Manifest:
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
        complete = len(shards) == len(shard_ranges(0, n_examples, per_file))
        manifest = Manifest.merged(header, n_examples, complete, shards, examples, skipped, refused)
        fsio.atomic_write_json(path, manifest.as_dict())
    return manifest


def _recorded_entries(path: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """The listed and the rejected shard entries of a manifest ({} when it cannot be read)."""
    try:
        manifest = Manifest.read(path.parent)
        listed = {s["file"]: s for s in manifest.shards}
        rejected = {s["file"]: s for s in manifest.rejected if s.get("sha256")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # damaged, or no object
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
    if identity is not None and shard_options_sha256(meta) != identity:
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


def merge_run(path: str) -> int:
    """Rebuild manifest.json from the shards present (after job-array tasks, or when it was lost
    or damaged), of a run or of every run below `path`; every shard is checked."""
    status = 0
    for run_path in run_dirs_below(path):
        problem = manifest_problem(run_path)
        if problem is None:
            manifest = Run(run_path).manifest
            header, n_examples = manifest.header(), manifest.n_examples
        else:
            header, n_examples = header_from_shards(run_path)
            print(f"{run_path} {problem}: rebuilding it from the metadata of its shards")
        merge_manifest(run_path, header, n_examples, header["shard_size"], {}, check=True)
        status |= verify_one(run_path)
    return status
