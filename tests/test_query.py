"""gradproj query: the same top-k, ids and scores, to the last bit, as extract + score."""

import io
import json
import os
import stat

import pytest

from gradproj.cli import main
from gradproj.query import QueryConfig, format_table, run_query
from tests.conftest import STUDY_TOP_K as TOP_K
from tests.conftest import conversations, snapshot, user_error_line, write_jsonl


def topk_of(score_dir, test_id: str) -> dict:
    for line in (score_dir / "topk.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["test_id"] == test_id:
            return record
    raise AssertionError(f"{test_id} not in {score_dir}")


@pytest.mark.parametrize("variant", ["full", "rademacher_16"])
def test_query_gives_the_scores_of_extract_and_score_bit_for_bit(tiny_study, variant, tmp_path):
    """Several queries of one file against extract + score of that file (a query's batch mates
    pad it, which moves the last bits of a real model's gradient: compare like with like)."""
    queries = write_jsonl(tmp_path / "q.jsonl", tiny_study["test_rows"][1:4])
    cfg = QueryConfig(train=str(tiny_study["train", variant]), messages=str(queries), top_k=TOP_K,
                      precondition="none")  # fmt: skip
    results = run_query(cfg)
    assert [r["query_id"] for r in results] == ["q_1", "q_2", "q_3"]
    assert {r["precondition"] for r in results} == {"none"}
    test_run = tiny_study["extract"](queries, tmp_path / "g")[variant]
    score_dir = tiny_study["score"](test_run, tmp_path / "scores", variant)
    for result in results:
        expected = topk_of(score_dir, result["query_id"])
        for name in ("dot", "cosine"):
            pros, cons = result[name]["proponents"], result[name]["opponents"]
            assert [e["id"] for e in pros] == expected[name]["top_ids"]
            assert [e["id"] for e in cons] == expected[name]["bottom_ids"]
            # fp32 scores written as JSON floats by both: equal floats are equal bits
            assert [e[name] for e in pros] == expected[name]["top_scores"]
            assert [e[name] for e in cons] == expected[name]["bottom_scores"]
            assert [e["rank"] for e in pros] == list(range(1, TOP_K + 1))
            assert [e["rank"] for e in cons] == [9, 8, 7, 6]  # of 9 scored (2 skipped)


def test_query_preconditioned_gives_the_scores_of_score_precondition_gram(tiny_study, tmp_path):
    """--precondition applies to a query as to `gradproj score`: the same whitened scores."""
    from gradproj.cli import score_main

    queries = write_jsonl(tmp_path / "q.jsonl", tiny_study["test_rows"][1:3])
    train = tiny_study["train", "rademacher_16"]
    gram = tmp_path / "gram.safetensors"
    cfg = QueryConfig(train=str(train), messages=str(queries), top_k=TOP_K,
                      precondition="gram", curvature=str(gram))  # fmt: skip
    results = run_query(cfg)
    test_run = tiny_study["extract"](queries, tmp_path / "g")["rademacher_16"]
    argv = ["--train", str(train), "--test", str(test_run), "--output", str(tmp_path / "s"),
            "--top_k", str(TOP_K), "--precondition", "gram", "--curvature", str(gram)]  # fmt: skip
    assert score_main(argv) == 0
    plain = run_query(
        QueryConfig(train=str(train), messages=str(queries), top_k=TOP_K, precondition="none")
    )
    for result, unwhitened in zip(results, plain, strict=True):
        expected = topk_of(tmp_path / "s", result["query_id"])
        for name in ("dot", "cosine"):
            pros = result[name]["proponents"]
            assert [e["id"] for e in pros] == expected[name]["top_ids"]
            assert [e[name] for e in pros] == expected[name]["top_scores"]
        assert result["dot"] != unwhitened["dot"]  # the whitening changed something


def params_run(model, dataset, out):
    """A params kronecker 2x3 run of the tiny model's attention layers over `dataset`."""
    from gradproj.cli import extract_main

    argv = [str(model), str(dataset), "0", "--gradients_output_path", str(out),
            "--max_seq_length", "40", "--target", "params", "--modules", "*.self_attn.*",
            "--random_projection", "--proj_type", "kronecker", "--proj_dim", "2x3"]  # fmt: skip
    assert extract_main(argv) == 0
    return out / "params_kronecker_2x3" / model.name / dataset.stem / "train" / "0"


def test_query_of_a_params_run_defaults_to_score_precondition_gram(
    tiny_llama, tiny_study, tmp_path, capsys
):
    """With no --precondition, a query of a projected run is whitened by the train Gram: the
    scores of extract + `gradproj score --precondition gram`, to the last bit, and it says so."""
    from gradproj.cli import score_main

    train = params_run(tiny_llama, tiny_study["train_file"], tmp_path / "g")
    queries = write_jsonl(tmp_path / "q.jsonl", tiny_study["test_rows"][1:4])
    results = run_query(QueryConfig(train=str(train), messages=str(queries), top_k=TOP_K))
    test = params_run(tiny_llama, queries, tmp_path / "g")
    argv = ["--train", str(train), "--test", str(test), "--output", str(tmp_path / "s"),
            "--top_k", str(TOP_K), "--precondition", "gram"]  # fmt: skip
    assert score_main(argv) == 0
    for result in results:
        assert result["method"] == "params kronecker_2x3, 8 modules · gram"
        assert (result["precondition"], result["damping"]) == ("gram", 1.0)
        expected = topk_of(tmp_path / "s", result["query_id"])
        for name in ("dot", "cosine"):
            for kind, key in (("proponents", "top"), ("opponents", "bottom")):
                listed = result[name][kind]
                assert [e["id"] for e in listed] == expected[name][f"{key}_ids"]
                assert [e[name] for e in listed] == expected[name][f"{key}_scores"]
    capsys.readouterr()
    assert main(["query", "--train", str(train), "--messages", str(queries)]) == 0
    out = capsys.readouterr().out
    assert "  scored by params kronecker_2x3, 8 modules · gram (--precondition none" in out


def test_json_output_round_trips_and_carries_the_train_texts(tiny_study, capsys):
    row = tiny_study["test_rows"][2]
    user, assistant = row["messages"][0]["content"], row["messages"][1]["content"]
    train = str(tiny_study["train", "rademacher_16"])
    argv = ["query", "--train", train, "--prompt", user, "--response", assistant,
            "--format", "json", "--top_k", "3", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    again = run_query(QueryConfig(train=train, prompt=user, response=assistant, top_k=3))
    assert printed == json.loads(json.dumps(again))
    assert printed[0]["query_id"] == "query_0"
    lines = tiny_study["train_file"].read_text().splitlines()
    train_rows = {r["id"]: r for r in map(json.loads, lines)}
    first = printed[0]["cosine"]["proponents"][0]
    texts = [m["content"] for m in train_rows[first["id"]]["messages"]]
    assert first["text"] == "\n".join(texts)
    assert set(first) == {"rank", "id", "dot", "cosine", "text"}


def test_table_reads_stdin_and_lists_both_kinds(tiny_study, capsys, monkeypatch):
    line = json.dumps(tiny_study["test_rows"][0]) + "\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(line.encode())))
    train = str(tiny_study["train", "full"])
    argv = ["query", "--train", train, "--messages", "-", "--func", "dot"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("query q_0: ")
    assert out.splitlines()[1] == "  scored by embeddings full (plain scores)"  # full: no gram
    assert "proponents by dot:" in out and "opponents by dot:" in out
    assert "cosine by" not in out and len(out.splitlines()) == 2 + 2 * (2 + 9)


def test_query_without_an_assistant_token_left_is_refused(tiny_study, capsys):
    train = str(tiny_study["train", "rademacher_16"])
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 20)
    argv = ["query", "--train", train, "--prompt", long_prompt, "--response", "Paris."]
    line = user_error_line(main, argv, capsys)
    assert "query 'query_0' cannot be explained: no label token within max_seq_length=40" in line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--prompt", "hi"], "--prompt and --response go together"),
        (["--messages", "x.jsonl", "--prompt", "a", "--response", "b"], "not both"),
        (["--messages", "missing.jsonl"], "--messages missing.jsonl: cannot read it"),
    ],
)
def test_bad_queries_are_refused_before_the_model_loads(tiny_study, argv, expected, capsys):
    train = str(tiny_study["train", "full"])
    line = user_error_line(main, ["query", "--train", train, *argv], capsys)
    assert expected in line


def test_a_query_without_an_answer_and_a_moved_dataset_are_refused(tiny_study, tmp_path, capsys):
    train = str(tiny_study["train", "full"])
    unanswered = {"messages": [{"role": "user", "content": "x"}]}
    no_answer = write_jsonl(tmp_path / "q.jsonl", [unanswered])
    line = user_error_line(main, ["query", "--train", train, "--messages", str(no_answer)], capsys)
    assert "query 1: no assistant turn" in line
    other = write_jsonl(tmp_path / "other.jsonl", conversations(11)[::-1])
    argv = ["query", "--train", train, "--prompt", "a", "--response", "b", "--dataset", str(other)]
    line = user_error_line(main, argv, capsys)
    assert "does not hold the train run's example" in line


def test_a_mean_run_is_refused(tiny_llama, tmp_path, capsys):
    from gradproj.cli import extract_main

    dataset = write_jsonl(tmp_path / "mean_set.jsonl", conversations(3))
    argv = [str(tiny_llama), str(dataset), "0", "--gradients_output_path", str(tmp_path),
            "--max_seq_length", "40", "--mode", "store_mean"]  # fmt: skip
    assert extract_main(argv) == 0
    run = tmp_path / "full_mean" / tiny_llama.name / "mean_set" / "train" / "0"
    argv = ["query", "--train", str(run), "--prompt", "a", "--response", "b"]
    assert "(--mode store_mean), not one per train example" in user_error_line(main, argv, capsys)


def test_a_model_no_longer_reachable_is_refused(tiny_study, tmp_path, capsys):
    import shutil

    train = tmp_path / "moved_run"
    shutil.copytree(tiny_study["train", "full"], train)
    manifest = json.loads((train / "manifest.json").read_text())
    manifest["options"]["model"] = str(tmp_path / "deleted_model")
    (train / "manifest.json").write_text(json.dumps(manifest))
    argv = ["query", "--train", str(train), "--prompt", "a", "--response", "b"]
    line = user_error_line(main, argv, capsys)
    assert f"model '{tmp_path / 'deleted_model'}': no such directory" in line


# --- Issue 30: hostile query input and output ---


def refused(argv, capsys, *roots) -> str:
    """The error line of a query refused with exit 2, no traceback and nothing changed below
    `roots`, before the model loaded (the queries' extraction is where it loads)."""
    before = snapshot(*roots)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("gradproj.query.extract_queries", loaded_the_model)
        line = user_error_line(main, ["query", *argv], capsys)
    assert snapshot(*roots) == before
    return line


def loaded_the_model(*args):
    raise AssertionError("the query was not refused before the model loads")


def test_a_fifo_as_curvature_is_refused_and_kept(tiny_study, tmp_path, capsys):
    train = tiny_study["train", "rademacher_16"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    argv = ["--train", str(train), "--prompt", "a", "--response", "b", "--precondition", "gram",
            "--curvature", str(fifo)]  # fmt: skip
    line = refused(argv, capsys, tmp_path, train)
    assert line.startswith(f"error: --curvature {fifo} is a named pipe (FIFO), where gradproj ")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


@pytest.mark.parametrize("damping", ["1e300", "1e-300", "inf"])
def test_a_damping_outside_its_range_is_refused(tiny_study, tmp_path, capsys, damping):
    train = tiny_study["train", "rademacher_16"]
    argv = ["--train", str(train), "--prompt", "a", "--response", "b", "--precondition", "gram",
            "--damping", damping]  # fmt: skip
    line = refused(argv, capsys, train)
    assert line.startswith(f"error: --damping {float(damping):g}: use a value from 1e-08 to 1e+06")


def latin1(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("latin-1") + b"\n"


MESSAGES = {  # file bytes -> the error
    "latin-1": (
        latin1({"messages": [{"role": "user", "content": "café"},
                             {"role": "assistant", "content": "oui"}]}),
        "--messages {file}: not UTF-8 text (byte 0xe9 at offset 46); save it as UTF-8",
    ),
    "binary": (
        bytes(range(256)),
        "--messages {file}: not UTF-8 text (byte 0x80 at offset 128); save it as UTF-8",
    ),
    "lone surrogate": (
        b'{"messages": [{"role": "user", "content": "half \\ud800"}, '
        b'{"role": "assistant", "content": "x"}]}\n',
        "{file} query 1: a string holds an unpaired surrogate ('\\ud800'), which is not valid "
        "Unicode text",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", MESSAGES)
def test_messages_that_are_not_unicode_text_are_refused(tiny_study, tmp_path, capsys, case):
    content, expected = MESSAGES[case]
    messages = tmp_path / "q.jsonl"
    messages.write_bytes(content)
    train = tiny_study["train", "rademacher_16"]
    line = refused(["--train", str(train), "--messages", str(messages)], capsys, tmp_path, train)
    assert line == "error: " + expected.format(file=messages)


def test_a_prompt_that_is_not_utf8_is_refused(tiny_study, capsys):
    train = tiny_study["train", "rademacher_16"]
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # as Python decodes such an argv
    line = refused(["--train", str(train), "--prompt", prompt, "--response", "b"], capsys, train)
    assert "query 1: a string holds an unpaired surrogate ('\\udce9')" in line


def test_raw_line_separators_and_control_characters_are_text_escaped_in_the_table(
    tiny_study, tmp_path, capsys
):
    """U+2028 and U+0085 are valid raw in a JSON string; the table escapes ESC and the like."""
    rows = [
        {"id": "q_\x1b]0;title\x07", "messages": [
            {"role": "user", "content": "What is\u2028the capital\x1b[2J of France?"},
            {"role": "assistant", "content": "Paris.\u0085\x1b[31mRed"}]},
    ]  # fmt: skip
    messages = tmp_path / "q.jsonl"
    messages.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert "\u2028" in messages.read_text() and len(messages.read_text().splitlines()) > 1
    train = str(tiny_study["train", "rademacher_16"])
    before = snapshot(tmp_path, tiny_study["train", "rademacher_16"])
    assert main(["query", "--train", train, "--messages", str(messages), "--top_k", "2"]) == 0
    out = capsys.readouterr().out
    assert snapshot(tmp_path, tiny_study["train", "rademacher_16"]) == before
    assert out.startswith("query q_\\x1b]0;title\\x07: What is the capital\\x1b[2J of France? ")
    assert "Paris. \\x1b[31mRed" in out
    assert all(c.isprintable() for line in out.splitlines() for c in line)
    assert main(["query", "--train", train, "--messages", str(messages), "--format", "json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["messages"] == rows[0]["messages"] and result["query_id"] == rows[0]["id"]


def test_table_escapes_control_characters_of_train_ids_and_texts():
    entry = {"rank": 1, "id": "t\x1b[1m", "dot": 1.0, "cosine": 0.5, "text": "a\x9bb\x00c\u202ed"}
    results = [{"query_id": "q", "text": "x", "method": "m", "precondition": "none",
                "dot": {"proponents": [entry], "opponents": []}}]  # fmt: skip
    table = format_table(results, ("dot",))
    assert "t\\x1b[1m" in table and "a\\x9bb\\x00c\\u202ed" in table
    assert all(c.isprintable() for line in table.splitlines() for c in line)
