"""The environment (issue 14): umask, read-only and full disks, bugs, score directories, claims."""

import builtins
import errno
import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from gradproj import fsio, models, scoredir, store
from gradproj.cli import extract_main, score_main
from gradproj.errors import run_cli
from tests.conftest import REPO

MAX_LEN = 40


def extract_argv(model, dataset, out, *extra):
    return [str(model), str(dataset), "0", "--gradients_output_path", str(out),
            "--max_seq_length", str(MAX_LEN), "--gradients_per_file", "4", *extra]  # fmt: skip


def full_run(out, model, dataset, variant="full"):
    return out / variant / model.name / dataset.stem / "train" / "0"


def cli(main, argv, capsys) -> tuple[int, str]:
    """Run a command's main as the CLI does; return its exit code and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    return exit_info.value.code, capsys.readouterr().err


def tree(root) -> dict:
    """Every file below root (its path relative to root) with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def run_contents(run) -> dict:
    """A run directory's shard bytes and its manifest, less where it was written and the locks."""
    contents = {k: v for k, v in tree(run).items() if ".lock" not in k}
    manifest = json.loads(contents.pop("manifest.json"))
    del manifest["options"]["gradients_output_path"]
    return contents | {"manifest.json": manifest}


# --- umask ---


@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]
)
def test_every_file_and_directory_honours_the_umask(
    tiny_llama, sft_file, tmp_path, umask, file_mode, dir_mode
):
    out, scores = tmp_path / "g", tmp_path / "scores"
    old = os.umask(umask)
    try:
        argv = extract_argv(tiny_llama, sft_file, out, "--random_projection", "--proj_dim", "16")
        assert extract_main(argv) == 0
        run = full_run(out, tiny_llama, sft_file, "rademacher_16")
        assert extract_main(["--merge", str(run)]) == 0
        argv = ["--train", str(run), "--test", str(run), "--output", str(scores), "--mapped"]
        assert score_main(argv) == 0
    finally:
        os.umask(old)
    written = [p for root in (out, scores) for p in (root, *root.rglob("*"))]
    kinds = {".lock", "manifest.json", "scores.safetensors", "topk.jsonl", "summary.json"}
    assert kinds <= {p.name for p in written}
    assert any(p.suffix == ".safetensors" and p.parent == run for p in written)
    assert any(p.parent.name == ".locks" for p in written)
    assert any(p.parent.name == "mapped" for p in written)
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (dir_mode if path.is_dir() else file_mode), (path, oct(mode))


def test_a_directory_made_whole_honours_the_umask(tmp_path):
    """fsio.create_dir (retrain's parts, the converted bundled model): tempfile makes 0700."""
    old = os.umask(0o027)
    try:
        fsio.create_dir(tmp_path / "out", lambda new: (new / "file").write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert (tmp_path / "out" / "file").read_text() == "x"


def test_a_directory_made_first_by_another_process_is_kept(tmp_path):
    def build(new):
        (new / "file").write_text("ours")
        (tmp_path / "out").mkdir()  # another process renames its directory in meanwhile
        (tmp_path / "out" / "file").write_text("theirs")

    fsio.create_dir(tmp_path / "out", build)
    assert (tmp_path / "out" / "file").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # ours removed


# --- read-only and full disks ---


class ReadOnly:
    """Every write below `root` fails with EROFS, as on a read-only mount (root, who runs the CI
    container, writes through permission bits, so a chmod would not do)."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self, root, monkeypatch):
        self.root = str(root)
        real_open, real_os_open = builtins.open, os.open

        def guarded_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                self.refuse(file)
            return real_open(file, mode, *args, **kwargs)

        def guarded_os_open(path, flags, *args, **kwargs):
            if flags & self.WRITE_FLAGS:
                self.refuse(path)
            return real_os_open(path, flags, *args, **kwargs)

        real_save = fsio.save_file

        def guarded_save(tensors, path, *args, **kwargs):
            self.refuse(path)
            return real_save(tensors, path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(io, "open", guarded_open)
        monkeypatch.setattr(os, "open", guarded_os_open)
        for name in ("mkdir", "replace", "rename", "unlink", "rmdir", "chmod"):
            monkeypatch.setattr(os, name, self.guard(getattr(os, name)))
        monkeypatch.setattr(fsio, "save_file", guarded_save)

    def refuse(self, path):
        if str(os.path.abspath(path)).startswith(self.root):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def guard(self, real):
        def guarded(path, *args, **kwargs):
            self.refuse(path)
            return real(path, *args, **kwargs)

        return guarded


def test_complete_run_on_a_read_only_mount_is_verified_without_writing(
    tiny_llama, sft_file, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "g"
    argv = extract_argv(tiny_llama, sft_file, out, "--random_projection", "--proj_dim", "full,16")
    assert extract_main(argv) == 0
    before = tree(out)
    ReadOnly(out, monkeypatch)
    code, err = cli(extract_main, argv, capsys)
    assert code == 0 and "Traceback" not in err
    assert tree(out) == before


def test_unwritable_output_directory_fails_before_the_model_loads(
    tiny_llama, sft_file, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "g"
    ReadOnly(out, monkeypatch)
    monkeypatch.setattr(models, "load_model", lambda *a: pytest.fail("model loaded"))
    code, err = cli(extract_main, extract_argv(tiny_llama, sft_file, out), capsys)
    run = full_run(out, tiny_llama, sft_file)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"error: cannot write the output directory {run} (Read-only file system); "
        "choose a writable --gradients_output_path"
    )
    assert not out.exists()


def test_full_disk_while_writing_a_shard_leaves_nothing_partial_and_resumes(
    tiny_llama, sft_file, tmp_path, monkeypatch, capsys
):
    """A write wrapper raises ENOSPC after writing part of the second shard (a tmpfs cannot be
    mounted without privileges, which the CI machine does not grant)."""
    argv = extract_argv(tiny_llama, sft_file, tmp_path / "ref")
    assert extract_main(argv) == 0
    reference = run_contents(full_run(tmp_path / "ref", tiny_llama, sft_file))
    real_save, calls = fsio.save_file, []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(fsio, "save_file", full_disk)
    out = tmp_path / "g"
    code, err = cli(extract_main, extract_argv(tiny_llama, sft_file, out), capsys)
    run = full_run(out, tiny_llama, sft_file)
    assert code == 2 and "Traceback" not in err
    shard = run / "4_8.safetensors"
    assert err.splitlines()[-1].startswith(f"error: {shard}: no space left on the device; ")
    assert sorted(p.name for p in run.iterdir()) == [".lock", ".locks", "0_4.safetensors",
                                                     "manifest.json"]  # fmt: skip
    assert [s["file"] for s in store.Run(run).manifest.shards] == ["0_4.safetensors"]
    monkeypatch.setattr(fsio, "save_file", real_save)
    assert extract_main(extract_argv(tiny_llama, sft_file, out)) == 0
    assert run_contents(run) == reference


def test_safetensors_io_error_becomes_the_os_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        fsio.save_safetensors({}, tmp_path / "missing" / "x.safetensors", {})
    assert info.value.errno == errno.ENOENT


def test_anything_else_is_reported_as_a_bug(capsys):
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(broken)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "Traceback" in err and 'raise RuntimeError("boom")' in err
    assert err.splitlines()[-2:] == [
        "internal error: RuntimeError: boom",
        "This is a bug in gradproj, not a problem of your input. Please report it to the "
        "gradproj issue tracker with the command line and the traceback above.",
    ]


# --- Score directories never mix ---


@pytest.fixture
def projected_run(tiny_llama, sft_file, tmp_path):
    argv = extract_argv(
        tiny_llama, sft_file, tmp_path / "g", "--random_projection", "--proj_dim", "16"
    )
    assert extract_main(argv) == 0
    return full_run(tmp_path / "g", tiny_llama, sft_file, "rademacher_16")


def test_scoring_again_replaces_the_directory_whole(projected_run, tmp_path):
    out = tmp_path / "scores"
    base = ["--train", str(projected_run), "--test", str(projected_run), "--output", str(out)]
    assert score_main([*base, "--mapped"]) == 0
    assert {p.name for p in out.iterdir()} == {"scores.safetensors", "topk.jsonl",
                                               "summary.json", "mapped"}  # fmt: skip
    assert score_main([*base, "--func", "dot"]) == 0
    assert {p.name for p in out.iterdir()} == {"scores.safetensors", "topk.jsonl", "summary.json"}
    assert json.loads((out / "summary.json").read_text())["functions"] == ["dot"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".scores.")] == [".scores.lock"]


def test_scoring_into_a_directory_of_other_files_is_refused(projected_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = ["--train", str(projected_run), "--test", str(projected_run), "--output", str(out)]
    code, err = cli(score_main, argv, capsys)
    assert code == 2
    assert err.splitlines()[-1] == (
        f"error: --output {out} holds files that are not the output of gradproj score "
        "(score_influence.py), and scoring replaces the directory whole; give a new or empty "
        "directory"
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_leftovers_of_a_killed_scoring_are_removed(projected_run, tmp_path):
    out = tmp_path / "scores"
    for leftover in (".scores.staging-abc", ".scores.old-abc"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "topk.jsonl").write_text("stale")
    argv = ["--train", str(projected_run), "--test", str(projected_run), "--output", str(out)]
    assert score_main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".scores.")) == [
        ".scores.lock"
    ]


def test_mapped_files_are_named_by_dataset_row(tiny_llama, sft_file, tmp_path):
    argv = extract_argv(tiny_llama, sft_file, tmp_path / "g", "--random_projection",
                        "--proj_dim", "16", "--dataset_split", "train[5:9]")  # fmt: skip
    assert extract_main(argv) == 0
    run = tmp_path / "g" / "rademacher_16" / tiny_llama.name / "sft" / "train_5_9" / "0"
    out = tmp_path / "scores"
    argv = ["--train", str(run), "--test", str(run), "--output", str(out), "--mapped"]
    assert score_main(argv) == 0
    rows = [
        json.loads(line)["test_index"] for line in (out / "topk.jsonl").read_text().splitlines()
    ]
    assert rows == [5, 6, 7, 8]
    assert sorted(p.name for p in (out / "mapped" / "dot").iterdir()) == [
        f"{i}.json" for i in (5, 6, 7, 8)
    ]
    first = json.loads((out / "mapped" / "dot" / "5.json").read_text())
    assert {entry["id"] for entry in first} == {f"ex_{i:03d}" for i in (5, 6, 7, 8)}


# --- Concurrent writers share the work ---

HOLD = """
import fcntl, sys
from pathlib import Path
folder = Path(sys.argv[1]) / ".locks"
folder.mkdir(parents=True, exist_ok=True)
f = open(folder / sys.argv[2], "a")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_shard_held_by_another_process_is_left_to_it_and_taken_when_it_dies(
    tiny_llama, sft_file, tmp_path, monkeypatch
):
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the run is in a thread
    assert extract_main(extract_argv(tiny_llama, sft_file, tmp_path / "ref")) == 0
    reference = run_contents(full_run(tmp_path / "ref", tiny_llama, sft_file))
    out = tmp_path / "g"
    run = full_run(out, tiny_llama, sft_file)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run), "4_8.lock"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    result = []
    worker = threading.Thread(
        target=lambda: result.append(extract_main(extract_argv(tiny_llama, sft_file, out)))
    )
    worker.start()
    others = [run / n for n in ("0_4.safetensors", "8_12.safetensors", "12_13.safetensors")]
    deadline = time.time() + 300
    while not all(p.exists() for p in others) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    assert all(p.exists() for p in others)
    assert not (run / "4_8.safetensors").exists() and worker.is_alive()  # waits for the holder
    holder.kill()  # a dead holder's claim is released with it
    holder.wait()
    worker.join(300)
    assert result == [0]
    assert run_contents(run) == reference


@pytest.mark.slow
def test_two_concurrent_extractions_split_the_shards(tiny_llama, sft_file, tmp_path):
    argv = extract_argv(tiny_llama, sft_file, tmp_path / "ref", "--gradients_per_file", "1")
    assert extract_main(argv) == 0
    reference = run_contents(full_run(tmp_path / "ref", tiny_llama, sft_file))
    out = tmp_path / "g"
    command = [sys.executable, "extract_gradients.py",
               *extract_argv(tiny_llama, sft_file, out, "--gradients_per_file", "1")]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    computed = [int(o.split(" gradients,")[0].rsplit(" ", 1)[-1]) for o in outputs]
    manifest = store.Run(full_run(out, tiny_llama, sft_file)).manifest
    assert sum(computed) == len(manifest.examples)  # no example computed twice
    run = full_run(out, tiny_llama, sft_file)
    assert run_contents(run) == reference
    print("gradients computed by each process:", computed)


def test_influence_output_has_no_staging_left_when_build_fails(tmp_path):
    out = tmp_path / "scores"

    def build(folder):
        (folder / "topk.jsonl").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    with pytest.raises(OSError), scoredir.exclusive_output(out):
        fsio.replace_dir(out, build)
    assert [p.name for p in tmp_path.iterdir()] == [".scores.lock"]  # the lock file is kept
