"""`gradproj verify`: which runs a path holds, and whether each is complete, printed with its
coverage of its split."""

from __future__ import annotations

from pathlib import Path

from gradproj.errors import UserError
from gradproj.store.manifest import Manifest
from gradproj.store.run import Run, shard_files
from gradproj.store.shards import MANIFEST, shard_span


def run_dirs_below(path: str) -> list[Path]:
    """`path` itself when it is a run directory, else every run directory below it: each folder
    holding a manifest.json or shards (a run whose manifest was lost is still a run)."""
    root = Path(path)
    if (root / MANIFEST).is_file() or shard_files(root) or not root.is_dir():
        return [root]
    found = {p.parent for p in root.rglob(MANIFEST)}
    found |= {p.parent for p in root.rglob("*.safetensors") if shard_span(p)}
    return sorted(found) or [root]


def verify_run(path: str) -> int:
    """Print complete, missing and corrupt shards of a run (or of every run below `path`);
    exit status 0 only when every run is complete (`VerifyReport.ok`)."""
    status = 0
    for run_path in run_dirs_below(path):
        try:
            status |= verify_one(run_path)
        except UserError as err:  # a run whose manifest is lost or damaged: say so, go on
            if not shard_files(run_path):
                raise
            print(f"{run_path}: INCOMPLETE: {err}")
            status = 1
    return status


def verify_one(path: Path) -> int:
    """Print what `Run.verify` finds in the run directory `path`; 0 when it is complete."""
    run = Run(path)
    report = run.verify()
    for name in report.missing:
        print(f"missing: {path / name}")
    for name, problem in report.corrupt.items():
        print(f"corrupt: {path / name} ({problem})")
    if not report.ok:
        print(f"{path}: INCOMPLETE: {report.summary()}; {report.advice(path)}")
        return 1
    print(
        f"{path}: complete: {len(report.complete)} shard(s), {len(run.manifest.examples)} "
        f"gradient(s), {len(run.manifest.skipped)} skipped{_coverage(run.manifest)}"
    )
    return 0


def _coverage(manifest: Manifest) -> str:
    """Which rows of its split a run holds, and how many it never read (`--limit`, a slice);
    the split's size is known when its dataset is a local path from here."""
    indices = [e["index"] for e in [*manifest.examples, *manifest.skipped]]
    if not indices:
        return ""
    first, last = min(indices), max(indices)
    total = _split_rows(manifest.dataset, manifest.split)
    limit = (manifest.options or {}).get("limit")
    text = f"; covers examples {first}-{last}" + (f" of {total}" if total else "")
    text += f" of split {manifest.split!r}" + (f" (--limit {limit})" if limit else "")
    unread = total - (last - first + 1) if total else 0
    return text + (f": the other {unread} were never read" if unread > 0 else "")


def _split_rows(dataset: str | None, split: str | None) -> int | None:
    """How many rows the run's split holds, all of them (not a join of the run's examples to
    its rows: `Run.dataset_rows` is that)."""
    from gradproj import data  # the datasets library: only for a run whose dataset is here

    if not dataset or not split or not Path(dataset).exists():
        return None
    try:
        return len(data.load_rows(dataset, data.split_name(split))[0])
    except Exception:  # unreadable here: the coverage is then said without the split's size
        return None
