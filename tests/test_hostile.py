"""Hostile and unusual input (issue 14): every row of its table, with the exact expectation."""

import json
import os
import re
import stat

import pytest
import torch

from gradproj import data, store
from gradproj.cli import extract_main as main
from gradproj.errors import run_cli
from tests.conftest import conversations, snapshot, write_jsonl

MAX_LEN = 40


def argv(model, dataset, out, *extra):
    return [str(model), str(dataset), "0", "--gradients_output_path", str(out),
            "--max_seq_length", str(MAX_LEN), "--gradients_per_file", "4", *extra]  # fmt: skip


def run_path(out, model, dataset, variant="full", split="train"):
    return out / variant / model.name / dataset.stem / split / "0"


def error_lines(argv_, capsys) -> list[str]:
    """Run the command as the CLI does; assert exit 2 and no traceback; return the error's lines
    (the `error:` line and the indented ones after it)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv_))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    first = next(i for i, x in enumerate(lines) if x.startswith("error: "))
    return [lines[first]] + [x for x in lines[first + 1 :] if x.startswith("  ")]


BAD_ROWS = {  # row -> the reason the validation gives
    3: ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
        "messages[0] has no 'role'"),
    5: ({"messages": [{"role": "user", "content": ["a", "b"]},
                      {"role": "assistant", "content": "x"}]},
        "messages[0] 'content' is a list, not a string"),
    7: ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
        "messages[0] 'content' is null, not a string"),
    9: ({"messages": "hello"}, "'messages' is a string, not a list of messages"),
    10: ({"messages": [{"role": "user", "content": "only a question"}]}, data.NO_ASSISTANT),
    11: ({"messages": [{"role": "robot", "content": "x"}]},
         "messages[0] has role 'robot'; use one of system, user, assistant"),
}  # fmt: skip


@pytest.mark.parametrize("row, reason", list(BAD_ROWS.values()), ids=list(map(str, BAD_ROWS)))
def test_row_problem_names_what_is_wrong(row, reason):
    assert data.row_problem(row, "sft") == reason


def test_valid_rows_of_each_paradigm_pass():
    good = conversations(4)
    assert all(data.row_problem(r, "sft") is None for r in good)
    assert data.row_problem({"text": "a document"}, "pre") is None
    assert data.row_problem({"text": None, "messages": good[0]["messages"]}, "mlm") is None
    assert data.row_problem({"text": 3}, "pre") == "'text' is a number, not a string"
    assert data.row_problem({"text": None}, "mlm") == "neither 'text' nor 'messages'"
    # pre and mlm take a conversation without an assistant turn: it is all loss
    assert data.row_problem({"messages": [{"role": "user", "content": "q"}]}, "pre") is None


def write_messages_file(path, bad_rows):
    """13 good conversations where each row of `bad_rows` gets its messages; one type per field.

    The datasets json loader needs one Arrow type per field, so rows whose content is a list
    (or messages a string) live in their own file in the tests that use them.
    """
    rows = conversations(13)
    for i, messages in bad_rows.items():
        rows[i] = rows[i] | {"messages": messages}
    return write_jsonl(path, rows)


def test_invalid_rows_stop_before_the_model_loads(sft_file, tmp_path, capsys):
    bad = {i: BAD_ROWS[i][0]["messages"] for i in (3, 7, 10)}
    dataset = write_messages_file(tmp_path / "bad.jsonl", bad)
    # a model path that does not exist: the validation must fail first
    lines = error_lines(argv(tmp_path / "no-model", dataset, tmp_path / "out"), capsys)
    assert lines[0] == (
        f"error: 3 row(s) of {dataset} train cannot be used; fix them, or pass "
        "--skip_invalid_rows to record them as skipped and go on"
    )
    assert lines[1:] == [f"  row {i} (id 'ex_{i:03d}'): {BAD_ROWS[i][1]}" for i in (3, 7, 10)]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", [5, 9])
def test_rows_of_another_type_are_refused_by_row(tiny_llama, tmp_path, capsys, case):
    rows = [{"id": "bad", **BAD_ROWS[case][0]}]
    dataset = write_jsonl(tmp_path / "other.jsonl", rows)
    lines = error_lines(argv(tiny_llama, dataset, tmp_path / "out"), capsys)
    assert lines[0].startswith("error: 1 row(s) of")
    assert lines[1] == f"  row 0 (id 'bad'): {BAD_ROWS[case][1]}"


def test_at_most_twenty_invalid_rows_are_listed(tmp_path):
    rows = conversations(30)
    for r in rows[:25]:
        r["messages"] = [{"role": "user", "content": "q"}]
    found = data.invalid_rows(
        data.load_split(str(write_jsonl(tmp_path / "d.jsonl", rows)), "train"), "sft"
    )
    lines = data.describe_invalid(found, "d", "fix them").splitlines()
    assert lines[0] == "25 row(s) of d cannot be used; fix them"
    assert len(lines) == 1 + data.MAX_NAMED + 1 and lines[-1] == "  ... and 5 more"


def test_skip_invalid_rows_records_each_with_its_reason(tiny_llama, tmp_path, capsys):
    bad = {i: BAD_ROWS[i][0]["messages"] for i in (3, 7, 10)}
    dataset = write_messages_file(tmp_path / "bad.jsonl", bad)
    assert main(argv(tiny_llama, dataset, tmp_path / "out", "--skip_invalid_rows")) == 0
    run = store.Run(run_path(tmp_path / "out", tiny_llama, dataset))
    assert run.manifest.complete
    skipped = {s["index"]: (s["id"], s["reason"]) for s in run.skipped}
    assert skipped == {i: (f"ex_{i:03d}", f"invalid row: {BAD_ROWS[i][1]}") for i in (3, 7, 10)}
    assert len(run.ids) == 10
    err = capsys.readouterr().err
    assert (
        f"warning: 3 row(s) of {dataset} train cannot be used; skipped (--skip_invalid_rows)" in err
    )
    assert f"  row 10 (id 'ex_010'): {data.NO_ASSISTANT}" in err


def test_skipping_gives_the_same_vectors_for_the_valid_rows(tiny_llama, tmp_path):
    """The bad rows leave the other examples' gradients as they were (up to batching's fp32
    rounding: the batches differ)."""
    bad = {3: BAD_ROWS[3][0]["messages"]}
    dataset = write_messages_file(tmp_path / "bad.jsonl", bad)
    clean = write_jsonl(tmp_path / "bad_clean.jsonl", conversations(13))
    for d, out in ((dataset, "a"), (clean, "b")):
        extra = ("--skip_invalid_rows", "--random_projection", "--proj_dim", "16")
        assert main(argv(tiny_llama, d, tmp_path / out, *extra)) == 0
    a = store.Run(run_path(tmp_path / "a", tiny_llama, dataset, "rademacher_16"))
    b = store.Run(run_path(tmp_path / "b", tiny_llama, clean, "rademacher_16"))
    ids_a, m_a = a.load_matrix()
    ids_b, m_b = b.load_matrix()
    keep = [i for i, x in enumerate(ids_b) if x != "ex_003"]
    assert ids_a == [ids_b[i] for i in keep]
    torch.testing.assert_close(m_a, m_b[keep], rtol=1e-5, atol=1e-7)


def test_malformed_json_line_names_file_and_line(tiny_llama, tmp_path, capsys):
    dataset = tmp_path / "broken.jsonl"
    good = [json.dumps(r) for r in conversations(5)]
    dataset.write_text("\n".join(good[:3] + ['{"id": "x", "messages": [}'] + good[3:]) + "\n")
    (line,) = error_lines(argv(tiny_llama, dataset, tmp_path / "out"), capsys)
    assert line.startswith(f"error: {dataset} line 4: not valid JSON (")


def test_json_line_that_is_not_an_object_names_its_line(tmp_path):
    dataset = tmp_path / "list.jsonl"
    dataset.write_text(json.dumps(conversations(1)[0]) + "\n[1, 2]\n")
    with pytest.raises(data.UserError, match=r"list\.jsonl line 2: a list, not a JSON object"):
        data.load_split(str(dataset), "train")


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file_is_named(tiny_llama, tmp_path, capsys, content):
    dataset = tmp_path / "empty.jsonl"
    dataset.write_text(content)
    (line,) = error_lines(argv(tiny_llama, dataset, tmp_path / "out"), capsys)
    assert line == (
        f"error: {dataset} is empty: it holds no rows; give a file with one JSON object per line"
    )


def test_slice_past_the_end_is_refused_naming_the_length(tiny_llama, sft_file, tmp_path, capsys):
    for split in ("train[0:200]", "train[20:]", "train[-14:]"):
        out = tmp_path / "out"
        (line,) = error_lines(argv(tiny_llama, sft_file, out, "--dataset_split", split), capsys)
        assert line == (
            f"error: split slice {split!r} reaches past the end of split 'train' of {sft_file}, "
            "which has 13 rows (0..12)"
        )
        assert not out.exists()


def test_slice_to_the_end_is_accepted(sft_file):
    rows, first = data.load_rows(str(sft_file), "train[10:13]")
    assert (len(rows), first) == (3, 10)
    rows, first = data.load_rows(str(sft_file), "train[-3:]")
    assert (len(rows), first) == (3, 10)


@pytest.mark.parametrize("extra", [["--proj_dim", "4096"], ["--proj_type", "normal"]])
def test_projection_options_without_random_projection_are_refused(
    tiny_llama, sft_file, tmp_path, capsys, extra
):
    out = tmp_path / "out"
    (line,) = error_lines(argv(tiny_llama, sft_file, out, *extra), capsys)
    assert line == (
        f"error: {extra[0]} without --random_projection would store only full gradients; "
        "add --random_projection (and 'full' in --proj_dim to keep them too)"
    )
    assert not out.exists()


def test_unpaired_surrogate_names_its_line(tmp_path):
    dataset = tmp_path / "surrogate.jsonl"
    row = conversations(1)[0]
    row["messages"][0]["content"] = "half a pair: \ud800"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in (conversations(1)[0], row, row)))
    with pytest.raises(data.UserError) as info:
        data.load_split(str(dataset), "train")
    assert str(info.value) == (
        f"{dataset} line 2: a string holds an unpaired surrogate ('\\ud800'), "
        "which is not valid Unicode text"
    )


def test_text_the_tokenizer_cannot_take_is_named_or_skipped(
    tiny_llama, sft_file, tmp_path, monkeypatch, capsys
):
    real = data.tokenize

    def fussy(tokenizer, row, index, *args):
        if index == 6:
            raise ValueError("cannot encode this")
        return real(tokenizer, row, index, *args)

    monkeypatch.setattr(data, "tokenize", fussy)
    out = tmp_path / "out"
    (line,) = error_lines(argv(tiny_llama, sft_file, out), capsys)
    assert line == (
        "error: row 6 (id 'ex_006'): the tokenizer cannot take it (ValueError: cannot encode "
        "this); fix it or --skip_invalid_rows"
    )
    assert main(argv(tiny_llama, sft_file, out, "--skip_invalid_rows")) == 0
    run = store.Run(run_path(out, tiny_llama, sft_file))
    assert {s["id"]: s["reason"] for s in run.skipped}["ex_006"] == (
        "invalid row: the tokenizer cannot take it (ValueError: cannot encode this)"
    )


# --- issue 25 items 9 and 10: leftovers and messages ---


def test_a_model_that_fails_to_load_leaves_no_run_directories(sft_file, tmp_path, capsys):
    """Each failed load used to leave `.lock` skeleton directories under the output root."""
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    out = tmp_path / "g"
    lines = error_lines(argv(empty_model, sft_file, out), capsys)
    assert lines[0].startswith(f"error: cannot load the tokenizer '{empty_model}'")
    assert not out.exists()


def test_a_missing_local_model_path_is_named_as_such(sft_file, tmp_path, capsys):
    lines = error_lines(argv("./nosuchdir", sft_file, tmp_path / "g"), capsys)
    assert lines == [
        "error: model './nosuchdir': no such directory; give a model directory or a hub id "
        "(owner/name)"
    ]


def test_a_missing_local_dataset_path_is_named_as_such():
    from gradproj.errors import UserError

    with pytest.raises(UserError, match=r"^dataset '\./nosuch\.jsonl': no such file or directory$"):
        data.load_rows("./nosuch.jsonl", "train")


@pytest.mark.parametrize(("offline", "says_unset"), [("1", True), (None, False)])
def test_unreachable_hub_advice_depends_on_offline_mode(monkeypatch, offline, says_unset):
    import huggingface_hub

    from gradproj import models
    from gradproj.errors import UserError

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "list_repo_refs", unreachable)
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with pytest.raises(UserError) as info:
        models.hub_branches("owner/model")
    assert ("unset HF_HUB_OFFLINE" in str(info.value)) is says_unset
    if not says_unset:
        assert str(info.value).endswith("can reach huggingface.co (or use a local copy)")


@pytest.mark.parametrize("value", [0, -5])
def test_batch_tokens_zero_is_refused_like_any_value_below_one(tmp_path, value):
    """0 used to mean the default silently, while -5 was refused."""
    from gradproj.errors import UserError
    from gradproj.extract import ExtractConfig

    with pytest.raises(UserError, match=r"^--batch_tokens must be at least 1$"):
        ExtractConfig(model="m", dataset="d", batch_tokens=value, device="cpu")


def test_a_tiny_projection_budget_names_a_budget_above_zero(tiny_llama, sft_file, tmp_path, capsys):
    """It said "raise --proj_memory_gb above 0.00"."""
    extra = ("--random_projection", "--proj_dim", "16", "--proj_memory_gb", "1e-9")
    (line,) = error_lines(argv(tiny_llama, sft_file, tmp_path / "g", *extra), capsys)
    needed = re.search(r"raise --proj_memory_gb above (\S+)$", line)
    assert needed and float(needed[1]) > 1e-9 and "0.00" not in line


def test_disk_full_advice_fits_scoring_too():
    """Scoring has nothing to resume: the advice must not promise it."""
    import errno

    from gradproj.errors import environment_message

    message = environment_message(OSError(errno.ENOSPC, "No space left", "/x/scores.safetensors"))
    assert message == (
        "/x/scores.safetensors: no space left on the device; free some space or choose another "
        "directory, then rerun the same command (nothing partial was kept; an extraction "
        "resumes from its finished shards)"
    )


def test_runs_of_different_max_seq_length_are_scored_with_a_warning(tmp_path, capsys):
    from gradproj.cli import score_main
    from tests.test_influence import synthetic_run

    train = synthetic_run(tmp_path / "train", list(torch.randn(4, 3, 8)), max_seq_length=64)
    test = synthetic_run(tmp_path / "test", list(torch.randn(2, 3, 8)), max_seq_length=128)
    assert score_main(["--train", str(train), "--test", str(test), "--output",
                       str(tmp_path / "s")]) == 0  # fmt: skip
    assert (
        "warning: the train run was extracted with max_seq_length 64 and the test run with 128: "
        "examples longer than 64 tokens were cut at different lengths; extract both with one "
        "--max_seq_length to compare like with like"
    ) in capsys.readouterr().err


# --- issue 30 item 1: an output path that is a FIFO (or a device) is refused, and kept ---


@pytest.mark.parametrize(
    ("command", "extra", "written"),
    [
        (
            "retrain",
            ["--model", "m", "--train_dataset", "a", "--test_dataset", "b"],
            "a regular file",
        ),
        ("compare", ["--reference", "r", "--candidates", "c"], "a directory"),
    ],
)
def test_a_fifo_as_output_is_refused_before_any_work(tmp_path, capsys, command, extra, written):
    from gradproj.cli import main as gradproj_main

    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: gradproj_main([command, *extra, "--output", str(fifo)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"error: --output {fifo} is a named pipe (FIFO), where gradproj writes {written} (it "
        "would replace it); give another path"
    )
    assert snapshot(tmp_path) == before and stat.S_ISFIFO(fifo.lstat().st_mode)
