"""Run directories: atomic safetensors shards, per-task manifest parts, a merged manifest.

A run directory holds `<start>_<end>.safetensors` shards (positions start..end-1 among the rows
the split chose; each example records its row of the split as `index`) and one `manifest.json`.
Each shard carries its own examples, skipped examples and a content checksum in its metadata, so a
shard is self-verifying: a rerun, a job-array task or `--merge` can rebuild the manifest from the
shards alone, and nothing depends on which process wrote what. A process claims a shard (an flock
in `.locks/`) before computing it, so concurrent processes on one run split the work.

`shards` holds one shard's format, `manifest` the manifest's (`Manifest`), `run` the reader of a
run, `merge` the manifest's rebuild and `gradproj merge`, `verify` `gradproj verify`; every write
goes through `gradproj.fsio`.
"""

from gradproj.store.manifest import Manifest
from gradproj.store.merge import (
    header_from_shards,
    merge_manifest,
    merge_run,
    recorded_checksums,
    run_lock,
)
from gradproj.store.run import (
    DTYPE_BYTES,
    Run,
    VerifyReport,
    examples_sha256,
    iter_shard_chunks,
    manifest_problem,
    shard_files,
    shards_sha256,
)
from gradproj.store.shards import (
    DERIVED_FIELDS,
    MANIFEST,
    PROCESS_FIELDS,
    RUN_FORMAT,
    SHARD_FORMAT,
    Shard,
    ShardRecord,
    check_shard,
    claim_shard,
    load_shard,
    mean_tensors,
    options_sha256,
    read_shard_metadata,
    remove_leftovers,
    shard_entry,
    shard_name,
    shard_options_sha256,
    shard_problem,
    shard_ranges,
    shard_span,
    shard_tensors,
    stored_norm,
    write_shard,
)
from gradproj.store.verify import run_dirs_below, verify_one, verify_run

__all__ = [
    "DERIVED_FIELDS",
    "DTYPE_BYTES",
    "MANIFEST",
    "Manifest",
    "PROCESS_FIELDS",
    "RUN_FORMAT",
    "SHARD_FORMAT",
    "Run",
    "Shard",
    "ShardRecord",
    "VerifyReport",
    "check_shard",
    "claim_shard",
    "examples_sha256",
    "header_from_shards",
    "iter_shard_chunks",
    "load_shard",
    "manifest_problem",
    "mean_tensors",
    "merge_manifest",
    "merge_run",
    "options_sha256",
    "read_shard_metadata",
    "recorded_checksums",
    "remove_leftovers",
    "run_dirs_below",
    "run_lock",
    "shard_entry",
    "shard_files",
    "shard_name",
    "shard_options_sha256",
    "shard_problem",
    "shard_ranges",
    "shard_span",
    "shard_tensors",
    "shards_sha256",
    "stored_norm",
    "verify_one",
    "verify_run",
    "write_shard",
]
