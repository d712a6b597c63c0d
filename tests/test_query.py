"""gradproj query: the same top-k, ids and scores, to the last bit, as extract + score."""

import io
import json

import pytest

from gradproj.cli import main
from gradproj.query import QueryConfig, run_query
from tests.conftest import STUDY_TOP_K as TOP_K
from tests.conftest import conversations, user_error_line, write_jsonl


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
    cfg = QueryConfig(train=str(tiny_study["train", variant]), messages=str(queries), top_k=TOP_K)
    results = run_query(cfg)
    assert [r["query_id"] for r in results] == ["q_1", "q_2", "q_3"]
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
    plain = run_query(QueryConfig(train=str(train), messages=str(queries), top_k=TOP_K))
    for result, unwhitened in zip(results, plain, strict=True):
        expected = topk_of(tmp_path / "s", result["query_id"])
        for name in ("dot", "cosine"):
            pros = result[name]["proponents"]
            assert [e["id"] for e in pros] == expected[name]["top_ids"]
            assert [e[name] for e in pros] == expected[name]["top_scores"]
        assert result["dot"] != unwhitened["dot"]  # the whitening changed something


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
    assert "proponents by dot:" in out and "opponents by dot:" in out
    assert "cosine by" not in out and len(out.splitlines()) == 1 + 2 * (2 + 9)


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
