"""store.Manifest (a run's manifest.json, typed) and Run.dataset_rows (the one join of a run's
examples to its dataset's rows)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gradproj import store
from gradproj.errors import UserError

GOLDEN = Path(__file__).resolve().parent / "golden"
MANIFESTS = sorted((GOLDEN / "expected" / "gradients").rglob("manifest.json"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.parent.relative_to(GOLDEN)))
def test_a_manifest_read_and_built_again_has_the_same_bytes(path):
    manifest = store.Manifest.read(path.parent)
    written = json.dumps(manifest.as_dict(), indent=1, sort_keys=False) + "\n"
    assert written == path.read_text()
    merged = store.Manifest.merged(
        manifest.header(), manifest.n_examples, manifest.complete, manifest.shards,
        manifest.examples, manifest.skipped, manifest.rejected,
    )  # fmt: skip
    assert merged.as_dict() == manifest.as_dict()
    assert list(merged.as_dict()) == list(manifest.as_dict())  # the key order too
    assert manifest.kind in ("full", "projected", "params_full", "hidden")
    assert manifest.examples and manifest.options["dataset"] == manifest.dataset


def test_a_manifest_rebuilt_from_shards_lacks_options_and_still_reads():
    raw = json.loads(MANIFESTS[0].read_text())
    del raw["options"], raw["versions"], raw["identity_sha256"]
    manifest = store.Manifest.from_dict(raw)
    assert manifest.options is None and manifest.identity_sha256 is None
    assert manifest.lacks(("options", "kind", "versions")) == ["options", "versions"]
    assert list(manifest.as_dict()) == list(raw)


def golden_run(tmp_path: Path, dataset_rows: list[str]) -> store.Run:
    """A golden train run whose manifest names a copy of its dataset with `dataset_rows`."""
    run = next(p.parent for p in MANIFESTS if "rademacher_16/" in str(p) and "/train/" in str(p))
    copy = shutil.copytree(run, tmp_path / "run")
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("".join(dataset_rows))
    raw = json.loads((copy / store.MANIFEST).read_text()) | {"dataset": str(dataset)}
    (copy / store.MANIFEST).write_text(json.dumps(raw))
    return store.Run(copy)


def test_dataset_rows_are_the_runs_examples_in_its_order(tmp_path):
    lines = (GOLDEN / "inputs" / "train.jsonl").read_text().splitlines(keepends=True)
    run = golden_run(tmp_path, lines)
    rows = run.dataset_rows()
    assert [row["id"] for row in rows] == run.ids
    assert len(rows) < len(lines)  # the skipped examples are not the run's


@pytest.mark.parametrize("change", ["reversed", "cut"])
def test_dataset_rows_of_another_dataset_are_refused_naming_row_and_ids(tmp_path, change):
    lines = (GOLDEN / "inputs" / "train.jsonl").read_text().splitlines(keepends=True)
    run = golden_run(tmp_path, lines[::-1] if change == "reversed" else lines[:2])
    with pytest.raises(UserError) as err:
        run.dataset_rows()
    message = str(err.value)
    first = run.manifest.examples[0 if change == "reversed" else 2]
    assert f"does not hold the train run's example {first['id']!r} at row {first['index']}" in (
        message
    )
    there = f"it has {json.loads(lines[-1 - first['index']])['id']!r} there"
    assert (there if change == "reversed" else "its split 'train' has 2 rows") in message
    assert message.endswith("pass the dataset the run was extracted from with --dataset")
    assert "\n" not in message


def test_a_manifest_that_is_no_json_object_is_refused_in_one_line(tmp_path):
    run = golden_run(tmp_path, [])
    (run.path / store.MANIFEST).write_text("[]")
    with pytest.raises(UserError, match="not a JSON object; rebuild it from the metadata of its"):
        store.Run(run.path)
    assert store.merge_run(str(run.path)) == 0
    assert store.Run(run.path).manifest.examples == run.manifest.examples
