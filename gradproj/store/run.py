"""Reading a run directory: its manifest, the one definition of a complete run
(`VerifyReport`), and its vectors, whole or in bounded chunks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from gradproj import fsio
from gradproj.errors import UserError
from gradproj.store.manifest import Manifest
from gradproj.store.shards import (
    MANIFEST,
    Shard,
    load_shard,
    shard_name,
    shard_problem,
    shard_ranges,
    shard_span,
)


def examples_sha256(manifest: Manifest) -> str:
    """The hash of a run's examples: the (dataset row, id) of each, kept or skipped."""
    held = sorted((e.get("index", -1), e["id"]) for e in manifest.examples + manifest.skipped)
    return hashlib.sha256(json.dumps(held).encode()).hexdigest()


def shards_sha256(manifest: Manifest) -> str:
    """The hash of a run's listed shards (file names and checksums): it names the stored
    vectors, and, unlike the manifest's own checksum, a merge that rewrites the manifest keeps
    it."""
    listed = [(s["file"], s["sha256"]) for s in manifest.shards]
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()


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
        parsed = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"has a {MANIFEST} that is not valid JSON ({err})"
    if not isinstance(parsed, dict):  # a `Manifest` is read from an object only
        return f"has a {MANIFEST} that is not a JSON object"
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
        self.manifest = Manifest.read(self.path)

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.manifest.examples]

    @property
    def skipped(self) -> list[dict]:
        return self.manifest.skipped

    def expected_shards(self) -> list[str]:
        per_file = self.manifest.shard_size
        return [shard_name(s, e) for s, e in shard_ranges(0, self.manifest.n_examples, per_file)]

    def verify(self) -> VerifyReport:
        recorded = {s["file"]: s["sha256"] for s in self.manifest.shards}
        recorded |= {s["file"]: s["sha256"] for s in self.manifest.rejected}
        listed = {s["file"] for s in self.manifest.shards}
        identity = self.manifest.identity_sha256
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
        if not self.manifest.examples:
            raise UserError(f"run {self.path} holds no gradients (every example was skipped)")

    def extraction_options(self, purpose: str, advice: str) -> dict:
        """The options of the run's extraction, as its manifest records them, for `purpose`
        (which reads the model again with them); shards do not carry them, so a manifest
        rebuilt from the shards lacks them, and the error says so with `advice`."""
        options = self.manifest.options
        if not isinstance(options, dict) or "model" not in options:
            raise UserError(
                f"{purpose} reads the model again with the extraction's options, which "
                f"{self.path / MANIFEST} does not record (rebuilt by gradproj merge from the "
                f"shards, which do not carry them, or written by an older gradproj); {advice}"
            )
        return options

    def dataset_rows(self, dataset: str | None = None, advice: str = "") -> list[dict]:
        """The rows of `dataset` (default: the run's own) that the run's examples are, in the
        run's order: each must carry the id the run recorded at its row, else a one-line error
        ending in `advice` (default: pass the dataset with --dataset). The one join of a run to
        its rows; its callers (`gradproj query`, `--mapped`, kfac's factor pass) join train runs."""
        from gradproj import data  # the datasets library: only a caller that reads texts needs it

        dataset = dataset or self.manifest.dataset
        split = self.manifest.split or "train"
        rows = data.load_split(dataset, data.split_name(split))  # indices are rows of the split
        advice = advice or "pass the dataset the run was extracted from with --dataset"
        found = []
        for example in self.manifest.examples:
            i, expected = example["index"], example["id"]
            if i >= len(rows):
                there = f"its split {split!r} has {len(rows)} rows"
            elif (actual := data.example_id(rows[i], i)) != expected:
                there = f"it has {actual!r} there"
            else:
                found.append(rows[i])
                continue
            raise UserError(
                f"{dataset} does not hold the train run's example {expected!r} at row {i} "
                f"({there}); {advice}"
            )
        return found

    def iter_shards(self) -> Iterator[Shard]:
        for entry in self.manifest.shards:
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
        with safe_open(str(self.path / self.manifest.shards[0]["file"]), framework="pt") as f:
            ragged = "values" in f.keys()  # noqa: SIM118
            rows = f.get_slice("values" if ragged else "vectors")
            return ragged, DTYPE_BYTES[rows.get_dtype()], rows.get_shape()[1]

    def longest_example(self) -> int:
        """The most stored positions of any example of a full run, from its shards' offsets."""
        longest = 0
        for entry in self.manifest.shards:
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
        dense = torch.zeros(self.manifest.max_seq_length, rows.shape[1])
        dense[: rows.shape[0]] = rows
        return dense.flatten()

    def _locate(self, i: int) -> tuple[str, int]:
        for entry in self.manifest.shards:
            if i < entry["n"]:
                return entry["file"], i
            i -= entry["n"]
        raise IndexError(f"example {i} out of range")


# --- Reading a run in bounded chunks (used by gradproj.influence and gradproj.curvature) ---

# Bytes per element of each safetensors dtype that runs hold (`get_slice(...).get_dtype()`)
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}


def iter_shard_chunks(run: Run, max_bytes: int) -> Iterator[Shard]:
    """A run's examples in manifest order, as chunks of its shards: `Shard`s of whole examples
    of about `max_bytes`.

    Slices are read through safetensors' lazy slicing, so a shard larger than memory is never
    loaded whole; a chunk holds at least one example, however large. Full chunks carry offsets
    that start at 0.
    """
    for entry in run.manifest.shards:
        with safe_open(str(run.path / entry["file"]), framework="pt") as f:
            meta = fsio.read_metadata(f)
            ids = [e["id"] for e in meta["examples"]]
            index = f.get_tensor("index")
            if "vectors" in f.keys():  # noqa: SIM118
                yield from _vector_chunks(f.get_slice("vectors"), ids, index, max_bytes)
            else:
                offsets = f.get_tensor("offsets")
                yield from _ragged_chunks(f.get_slice("values"), offsets, ids, index, max_bytes)


def _vector_chunks(vectors, ids: list[str], index: torch.Tensor, max_bytes: int):
    n, k = vectors.get_shape()
    step = max(1, max_bytes // max(1, k * DTYPE_BYTES[vectors.get_dtype()]))
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        yield Shard(ids=ids[i0:i1], index=index[i0:i1], vectors=vectors[i0:i1])


def _ragged_chunks(values, offsets: torch.Tensor, ids: list[str], index, max_bytes: int):
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
