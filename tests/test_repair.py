"""Damaged and moved runs (issue 25 items 2, 3, 4, 6, 8): every shard knows the run that made
it, one definition of a complete run, and each advised repair works."""

import json
import shutil

import pytest

from gradproj import store
from gradproj.cli import extract_main, main, score_main
from gradproj.errors import run_cli
from tests.conftest import conversations, write_jsonl
from tests.test_influence import synthetic_run


def extract_argv(model, dataset, out, *extra):
    return [str(model), str(dataset), "0", "--gradients_output_path", str(out),
            "--max_seq_length", "40", "--gradients_per_file", "4",
            "--random_projection", "--proj_dim", "16", *extra]  # fmt: skip


@pytest.fixture
def made(tiny_llama, tmp_path):
    """A finished rademacher_16 run of 9 examples (3 shards), and its bytes."""
    dataset = write_jsonl(tmp_path / "d.jsonl", conversations(9))
    out = tmp_path / "g"
    assert extract_main(extract_argv(tiny_llama, dataset, out)) == 0
    run = out / "rademacher_16" / tiny_llama.name / "d" / "train" / "0"
    return {"model": tiny_llama, "dataset": dataset, "out": out, "run": run, "bytes": files(run)}


def files(run) -> dict:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def outcome(command, argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a command run as the CLI runs it."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: command(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return exit_info.value.code, out, err


def flip_metadata_byte(shard):
    """Flip a digit of the first example's `index` in the shard's metadata: still valid JSON,
    and the tensors (and their checksum) are untouched."""
    raw = bytearray(shard.read_bytes())
    marker = b'\\"index\\": '  # inside the metadata string, quotes are escaped
    at = raw.index(marker) + len(marker)
    while not chr(raw[at]).isdigit():
        at += 1
    raw[at] = ord("7") if raw[at] != ord("7") else ord("8")
    shard.write_bytes(bytes(raw))


# --- item 2: every shard carries its run's identity ---


def test_each_shard_records_the_identity_of_its_run(made, tmp_path):
    manifest = store.Run(made["run"]).manifest
    identity = manifest.identity_sha256
    assert identity == store.options_sha256(manifest.identity | {"output": "rademacher_16"})
    for shard in store.shard_files(made["run"]):
        run = store.read_shard_metadata(shard)["run"]
        assert run["identity_sha256"] == identity
        assert run["n_examples"] == 9 and "options" not in run and "versions" not in run
    other = tmp_path / "other"
    argv = extract_argv(made["model"], made["dataset"], other, "--proj_seed", "7")
    assert extract_main(argv) == 0
    assert (
        store.Run(str(made["run"]).replace(str(made["out"]), str(other))).manifest.identity_sha256
        != identity
    )


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [("--proj_seed", "7", "proj_seed"), ("--max_seq_length", "64", "max_seq_length")],
)
def test_lost_manifest_and_other_options_are_refused(made, capsys, option, value, named):
    """It used to take the old shards and write a manifest claiming the new options."""
    (made["run"] / "manifest.json").unlink()
    argv = extract_argv(made["model"], made["dataset"], made["out"], option, value)
    code, _, err = outcome(extract_main, argv, capsys)
    assert code == 2
    assert err.splitlines()[-1] == (
        f"error: {made['run']} holds a run with different options ({named}); use another "
        "--gradients_output_path or delete that run"
    )
    assert not (made["run"] / "manifest.json").exists()


def test_lost_manifest_is_rebuilt_from_the_shards_by_a_rerun(made, capsys):
    (made["run"] / "manifest.json").unlink()
    code, out, err = outcome(extract_main, extract_argv(made["model"], made["dataset"],
                                                        made["out"]), capsys)  # fmt: skip
    assert code == 0
    assert f"note: {made['run']} has no manifest.json; it is rebuilt from the metadata" in err
    assert "3 shard(s) already present" in out
    assert files(made["run"]) == made["bytes"]


# --- item 3: a damaged shard is repaired by the advised rerun; one definition of complete ---


@pytest.mark.parametrize("damage", ["metadata_byte", "shard_of_another_run"])
def test_a_damaged_shard_is_recomputed_by_the_rerun(made, tmp_path, capsys, damage):
    shard = made["run"] / "4_8.safetensors"
    if damage == "metadata_byte":
        flip_metadata_byte(shard)
        why = "its checksum differs from the one manifest.json records"
    else:
        other = tmp_path / "other"
        argv = extract_argv(made["model"], made["dataset"], other, "--proj_seed", "7")
        assert extract_main(argv) == 0
        shutil.copy(next(other.rglob("4_8.safetensors")), shard)
        why = "made with other options than this run's (its identity hash differs)"
    capsys.readouterr()
    code, out, _ = outcome(main, ["verify", str(made["run"])], capsys)
    assert code == 1
    assert f"corrupt: {shard} ({why})" in out.splitlines()
    # merge agrees with verify (it said complete=True here): still incomplete, exit 1
    code, out, _ = outcome(main, ["merge", str(made["run"])], capsys)
    assert code == 1 and f"{made['run']}: INCOMPLETE: 2 complete, 1 corrupt" in out
    code, out, _ = outcome(main, ["verify", str(made["run"])], capsys)
    assert code == 1 and f"corrupt: {shard} ({why})" in out.splitlines()
    argv = ["--train", str(made["run"]), "--test", str(made["run"]), "--output",
            str(tmp_path / "s")]  # fmt: skip
    code, _, err = outcome(score_main, argv, capsys)
    assert code == 2 and f"1 corrupt (4_8.safetensors: {why}); rerun the extraction" in err
    # the advised rerun repairs it (it used to compute nothing: "3 shard(s) already present")
    argv = extract_argv(made["model"], made["dataset"], made["out"])
    code, out, err = outcome(extract_main, argv, capsys)
    assert code == 0 and f"recomputing {shard}: {why}" in err
    assert "2 shard(s) already present" in out
    assert files(made["run"]) == made["bytes"]
    assert outcome(main, ["verify", str(made["run"])], capsys)[0] == 0


def test_a_shard_holding_other_rows_is_recomputed(made, capsys):
    """Identity and checksum can match while the rows do not: a dataset edited in place."""
    rows = conversations(9)
    rows[5]["id"] = "renamed"
    write_jsonl(made["dataset"], rows)
    code, _, err = outcome(extract_main, extract_argv(made["model"], made["dataset"],
                                                      made["out"]), capsys)  # fmt: skip
    assert code == 0
    shard = made["run"] / "4_8.safetensors"
    assert f"recomputing {shard}: holds other examples than the dataset's rows it stands for" in err
    assert "renamed" in store.Run(made["run"]).ids


# --- item 4: an unreadable manifest ---


def test_an_invalid_json_manifest_is_rebuilt_by_merge(made, tmp_path, capsys):
    manifest = made["run"] / "manifest.json"
    manifest.write_text('{"format": "gradproj-run/1", "shards": [')
    argv = ["--train", str(made["run"]), "--test", str(made["run"]), "--output",
            str(tmp_path / "s")]  # fmt: skip
    code, _, err = outcome(score_main, argv, capsys)
    assert code == 2
    assert "is not valid JSON" in err and f"gradproj merge {made['run']}" in err
    code, out, _ = outcome(main, ["merge", str(made["run"])], capsys)
    assert code == 0
    assert out.splitlines()[0].startswith(f"{made['run']} has a manifest.json that is not valid")
    assert out.splitlines()[0].endswith("rebuilding it from the metadata of its shards")
    assert out.splitlines()[-1] == (
        f"{made['run']}: complete: 3 shard(s), 9 gradient(s), 0 skipped"
        "; covers examples 0-8 of 9 of split 'train'"
    )
    rebuilt = json.loads(manifest.read_text())
    original = json.loads(made["bytes"]["manifest.json"])
    for key in ("options", "versions"):  # what varies by process is not in the shards
        original.pop(key)
    assert rebuilt == original
    assert score_main(argv) == 0


def test_an_invalid_json_manifest_is_rebuilt_by_the_rerun(made, capsys):
    (made["run"] / "manifest.json").write_text("{not json")
    code, _, err = outcome(extract_main, extract_argv(made["model"], made["dataset"],
                                                      made["out"]), capsys)  # fmt: skip
    assert code == 0 and "has a manifest.json that is not valid JSON" in err
    assert files(made["run"]) == made["bytes"]


def test_merge_refuses_shards_of_two_runs(made, tmp_path, capsys):
    other = tmp_path / "other"
    argv = extract_argv(made["model"], made["dataset"], other, "--proj_seed", "7")
    assert extract_main(argv) == 0
    shutil.copy(next(other.rglob("4_8.safetensors")), made["run"] / "4_8.safetensors")
    (made["run"] / "manifest.json").unlink()
    code, _, err = outcome(main, ["merge", str(made["run"])], capsys)
    assert code == 2
    assert err.splitlines()[-1].startswith(
        f"error: {made['run']}: its shards were made by 2 runs with different options ("
    )
    assert not (made["run"] / "manifest.json").exists()


# --- item 6: a parent folder ---


def test_verify_and_merge_of_a_parent_see_a_run_without_manifest(made, capsys):
    (made["run"] / "manifest.json").unlink()
    code, out, _ = outcome(main, ["verify", str(made["out"])], capsys)
    assert code == 1
    assert f"{made['run']}: INCOMPLETE: {made['run']} has no manifest.json; rebuild it" in out
    code, out, _ = outcome(main, ["merge", str(made["out"])], capsys)
    assert code == 0 and "rebuilding it from the metadata of its shards" in out
    assert outcome(main, ["verify", str(made["out"])], capsys)[0] == 0


# --- item 8: duplicate ids ---


def test_duplicate_ids_are_refused_before_any_compute(tmp_path, capsys):
    rows = conversations(6)
    rows[4]["id"] = rows[1]["id"]
    rows[5]["id"] = rows[1]["id"]
    dataset = write_jsonl(tmp_path / "dup.jsonl", rows)
    argv = extract_argv(tmp_path / "no_model_needed", dataset, tmp_path / "g")
    code, _, err = outcome(extract_main, argv, capsys)
    assert code == 2
    assert err.splitlines()[-1] == (
        f"error: {dataset} train has 1 duplicate example id(s): 'ex_001' (rows 1, 4, 5); ids "
        "join every output (scores, top-k lists, metrics), so give each example its own id"
    )
    assert not (tmp_path / "g").exists()


def test_a_run_with_duplicate_ids_is_not_scored(tmp_path, capsys):
    import torch

    run = synthetic_run(tmp_path / "run", list(torch.randn(4, 8)))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["examples"][3]["id"] = manifest["examples"][0]["id"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    argv = ["--train", str(run), "--test", str(run), "--output", str(tmp_path / "s")]
    code, _, err = outcome(score_main, argv, capsys)
    assert code == 2
    assert err.splitlines()[-1].startswith(
        f"error: --train: run {run} has 1 duplicate example id(s): 's0' (rows 0, 3)"
    )
    assert not (tmp_path / "s").exists()
