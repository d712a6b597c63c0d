"""gradproj.scoredir: a score directory written by scoring reads back, and one written in a format
version this gradproj does not know is refused with a one-line error."""

import json
import os
import shutil
import signal
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gradproj import __version__, fsio, scoredir
from gradproj.cli import compare_main
from gradproj.errors import Terminated, UserError
from tests.conftest import user_error_line
from tests.test_influence import read_scores, score, synthetic_run


@pytest.fixture
def scored(tmp_path):
    """A real score directory: synthetic runs scored by `gradproj score`."""
    gen = torch.Generator().manual_seed(0)
    train = synthetic_run(tmp_path / "train", list(torch.randn(5, 8, generator=gen)))
    test = synthetic_run(tmp_path / "test", list(torch.randn(3, 8, generator=gen)))
    return score(train, test, tmp_path / "scores")


def test_load_score_dir_reads_what_scoring_wrote(scored):
    tensors, info = read_scores(scored)
    loaded = scoredir.load_score_dir(scored)
    assert loaded.train_ids == info["train_ids"] and loaded.test_ids == info["test_ids"]
    assert sorted(loaded.scores) == sorted(tensors) == ["cosine", "dot"]
    for name, matrix in tensors.items():
        assert (loaded.scores[name] == matrix.numpy()).all()
    assert loaded.summary["format"] == scoredir.SCORES_FORMAT == loaded.metadata["format"]
    assert scoredir.is_score_dir(scored)


def set_summary_format(path, value):
    summary = json.loads((path / scoredir.SUMMARY_FILE).read_text())
    summary.pop("format")
    if value is not None:
        summary = {"format": value} | summary
    (path / scoredir.SUMMARY_FILE).write_text(json.dumps(summary, indent=1))


def set_scores_format(path, value):
    file = path / scoredir.SCORES_FILE
    with safe_open(str(file), framework="pt") as f:
        info = fsio.read_metadata(f)
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    save_file(tensors, str(file), metadata={"gradproj": json.dumps(info | {"format": value})})


@pytest.mark.parametrize(
    ("edit", "file", "written"),
    [
        (set_summary_format, "summary.json", "score format 'gradproj-scores/9'"),
        (set_scores_format, "scores.safetensors", "score format 'gradproj-scores/9'"),
        (lambda path, _: set_summary_format(path, None), "summary.json", "no score format"),
    ],
    ids=["summary", "scores_metadata", "summary_without_format"],
)
def test_an_unknown_format_version_is_refused(scored, tmp_path, capsys, edit, file, written):
    candidate = shutil.copytree(scored, tmp_path / "candidate")  # a good one: only one is bad
    edit(scored, "gradproj-scores/9")
    message = (
        f"{scored}: {file} was written in {written}, which this gradproj (version "
        f"{__version__}) cannot read; rescore with this version or upgrade gradproj"
    )
    with pytest.raises(UserError) as info:
        scoredir.load_score_dir(scored)
    assert str(info.value) == message
    argv = ["--reference", str(scored), "--candidates", str(candidate), "--output",
            str(tmp_path / "report")]  # fmt: skip
    assert user_error_line(compare_main, argv, capsys) == f"error: {message}"
    assert not (tmp_path / "report").exists()


# --- One writer at a time (issue 25 item 1) ---


def test_a_second_scoring_into_a_held_output_fails_at_once(scored, tmp_path):
    before = tree_bytes(scored)
    with scoredir.exclusive_output(scored):
        with pytest.raises(UserError) as info:
            with scoredir.exclusive_output(scored):
                pass
    assert str(info.value) == (
        f"another scoring is writing --output {scored} (it holds "
        f"{scored.parent / ('.' + scored.name + '.lock')}); wait for it to finish, or give "
        "another --output"
    )
    assert tree_bytes(scored) == before


def test_a_live_scorings_staging_is_never_removed(scored, tmp_path):
    """The loser of two scorings used to delete the winner's staging directory mid-build."""
    seen = {}

    def build(folder):
        (folder / "topk.jsonl").write_text("being written")
        with pytest.raises(UserError):  # a second scoring starts meanwhile
            with scoredir.exclusive_output(scored):
                pass
        seen["staging still there"] = (folder / "topk.jsonl").is_file()
        (folder / scoredir.SUMMARY_FILE).write_text(json.dumps({"format": scoredir.SCORES_FORMAT}))

    with scoredir.exclusive_output(scored):
        fsio.replace_dir(scored, build)
    assert seen == {"staging still there": True}
    assert (scored / "topk.jsonl").read_text() == "being written"


def test_staging_of_a_dead_scoring_is_removed_and_a_lost_swap_undone(scored, tmp_path):
    """SIGKILL between the two renames leaves `.old-*` and no output: the next writer puts the
    previous scoring back, then removes the dead one's staging."""
    before = tree_bytes(scored)
    old = scored.parent / f".{scored.name}.old-abc"
    scored.rename(old)
    staging = scored.parent / f".{scored.name}.staging-abc"
    staging.mkdir()
    with scoredir.exclusive_output(scored):
        assert tree_bytes(scored) == before
    assert not old.exists() and not staging.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_scoring_removes_its_staging(scored, tmp_path, signum):
    before, handler = tree_bytes(scored), signal.getsignal(signal.SIGTERM)

    def build(folder):
        (folder / "topk.jsonl").write_text("partial")
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler interrupts this

    expected = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    with pytest.raises(expected), scoredir.exclusive_output(scored):
        fsio.replace_dir(scored, build)
    assert signal.getsignal(signal.SIGTERM) == handler  # the handler is put back
    assert tree_bytes(scored) == before
    assert [p.name for p in scored.parent.iterdir() if ".staging-" in p.name] == []


def tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- Provenance in compare (issue 25 item 5), kronecker labels (item 11) ---


def scoring_of(tmp_path, name, seed=0, skipped=(), **header):
    """A scoring of synthetic runs; `header` sets manifest fields of both, `skipped` adds
    skipped examples to the train run."""
    gen = torch.Generator().manual_seed(seed)
    train = synthetic_run(tmp_path / name / "train", list(torch.randn(5, 8, generator=gen)),
                          skipped=skipped, **header)  # fmt: skip
    test = synthetic_run(tmp_path / name / "test", list(torch.randn(3, 8, generator=gen)),
                         **header)  # fmt: skip
    return score(train, test, tmp_path / name / "scores")


def test_compare_refuses_scorings_of_other_data_with_the_same_ids(tmp_path, capsys):
    reference = scoring_of(tmp_path, "reference")
    other_data = scoring_of(tmp_path, "other_data", dataset="elsewhere.jsonl")
    argv = ["--reference", str(reference), "--candidates", str(other_data), "--output",
            str(tmp_path / "report")]  # fmt: skip
    assert user_error_line(compare_main, argv, capsys) == (
        f"error: {other_data} was scored from other runs than the reference {reference}: "
        "train dataset ('d' vs 'elsewhere.jsonl'); test dataset ('d' vs 'elsewhere.jsonl'); "
        "compare scorings of the same train and test examples"
    )
    assert not (tmp_path / "report").exists()


def test_compare_accepts_other_projections_of_the_same_examples(tmp_path):
    from gradproj.analysis.scores import check_provenance

    reference = scoredir.load_score_dir(scoring_of(tmp_path, "a"))
    projection = {"type": "rademacher", "seed": 7, "dim": 8}
    candidate = scoredir.load_score_dir(scoring_of(tmp_path, "b", seed=1, projection=projection))
    check_provenance(reference, candidate)  # no error
    assert (
        candidate.summary["train_manifest"]["examples_sha256"]
        == (reference.summary["train_manifest"]["examples_sha256"])
    )
    renamed = scoredir.load_score_dir(scoring_of(tmp_path, "c", skipped=[{"index": 5, "id": "x"}]))
    with pytest.raises(UserError, match="train n_examples .*train examples_sha256"):
        check_provenance(reference, renamed)


@pytest.mark.parametrize(
    ("projection", "dim", "label"),
    [
        ({"type": "kronecker", "dim": "16x16"}, 256, "kronecker_16x16"),
        ({"type": "rademacher", "dim": 64}, 64, "rademacher_64"),
        (None, None, "full"),
    ],
)
def test_dim_and_label_of_every_projection(tmp_path, projection, dim, label):
    """`int('16x16')` used to raise for the parameter target's kronecker score directories."""
    summary = {"train_manifest": {"projection": projection}}
    score_dir = scoredir.ScoreDir(tmp_path, {}, [], [], summary)
    assert (score_dir.dim, score_dir.label) == (dim, label)
