"""Ground-truth retrieval: source ranks, hit rates, MRR and their CIs, BM25, the hidden-state
baseline, and compare_projections.py --retrieval end to end on a tiny model."""

import math

import bm25s
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradproj import data, store
from gradproj.analysis.retrieval import (
    bm25_scores,
    find_sources,
    ranks_of_sources,
    retrieval_statistics,
    source_ids,
    source_ranks,
)
from gradproj.cli import compare_main, extract_main, score_main
from gradproj.errors import UserError
from gradproj.influence import ranked
from gradproj.scoredir import ScoreDir
from tests.conftest import conversations, user_error_line, write_jsonl

MAX_LEN = 40
TRAIN_IDS = [f"t{j}" for j in range(7)]


def score_dir(matrix, test_ids) -> ScoreDir:
    return ScoreDir(None, {"dot": np.asarray(matrix, dtype=np.float32)}, TRAIN_IDS, test_ids, {})


def test_hit_rates_and_mrr_match_a_hand_computed_case_with_ties():
    scores = [
        [0.9, 0.5, 0.1, 0.2, 0.0, 0.0, 0.0],  # source t0 first: rank 1
        [0.3, 0.3, 0.3, 0.1, 0.0, 0.0, 0.0],  # source t1 tied with t0 (ahead) and t2: rank 2
        [0.9, 0.8, 0.7, 0.6, 0.55, 0.51, 0.5],  # source t6 last: rank 7
    ]
    sources = {"a": "t0", "b": "t1", "c": "t6"}
    ranks = source_ranks(score_dir(scores, ["a", "b", "c"]), "dot", sources)
    assert ranks.tolist() == [1, 2, 7]
    row = retrieval_statistics(ranks, n_bootstrap=200)
    assert row["n_test"] == 3
    assert row["top1"] == pytest.approx(1 / 3)
    assert row["top5"] == pytest.approx(2 / 3)
    assert row["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 7) / 3)


def test_source_rank_is_its_place_in_score_influences_ranked_list():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, size=(40, 7)).astype(np.float32)  # many ties
    test_ids = [f"q{i}" for i in range(40)]
    sources = {q: TRAIN_IDS[rng.integers(7)] for q in test_ids}
    ranks = source_ranks(score_dir(scores, test_ids), "dot", sources)
    order = ranked(torch.from_numpy(scores)).numpy()
    want = [
        order[i].tolist().index(TRAIN_IDS.index(sources[q])) + 1 for i, q in enumerate(test_ids)
    ]
    assert ranks.tolist() == want


def test_bootstrap_cis_cover_the_estimate_and_shrink_with_more_test_examples():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 500):
        ranks = rng.choice([1, 2, 4, 9], size=n, p=[0.5, 0.2, 0.2, 0.1])
        row = retrieval_statistics(ranks, n_bootstrap=2000, seed=1)
        for stat in ("top1", "top5", "mrr"):
            assert row[f"{stat}_ci_low"] <= row[stat] <= row[f"{stat}_ci_high"]
        widths.append([row[f"{s}_ci_high"] - row[f"{s}_ci_low"] for s in ("top1", "top5", "mrr")])
    assert all(big < small for small, big in zip(*widths, strict=True))


def test_several_related_ids_count_by_the_best_ranked_one_as_a_brute_force_count_says():
    rng = np.random.default_rng(7)
    n_test, n_train = 60, 12
    train_ids = [f"t{j}" for j in range(n_train)]
    test_ids = [f"q{i}" for i in range(n_test)]
    scores = rng.integers(0, 4, size=(n_test, n_train)).astype(np.float32)  # many ties
    related = {
        q: [str(t) for t in rng.choice(train_ids, size=rng.integers(1, 5), replace=False)]
        for q in test_ids
    }
    ranks = ranks_of_sources(scores, train_ids, test_ids, related)
    order = ranked(torch.from_numpy(scores)).numpy()  # score_influence.py's ranked lists
    first, top5, reciprocal = 0, 0, 0.0
    for i, q in enumerate(test_ids):
        listed = [train_ids[j] for j in order[i]]
        place = next(r for r, t in enumerate(listed, 1) if t in related[q])
        assert ranks[i] == place
        first += listed[0] in related[q]
        top5 += any(t in related[q] for t in listed[:5])
        reciprocal += 1 / place
    row = retrieval_statistics(ranks, n_bootstrap=200)
    assert row["top1"] == pytest.approx(first / n_test)
    assert row["top5"] == pytest.approx(top5 / n_test)
    assert row["mrr"] == pytest.approx(reciprocal / n_test)
    # one id, as a string or a one-element list, ranks as before
    single = {q: related[q][0] for q in test_ids}
    listed_once = {q: [related[q][0]] for q in test_ids}
    np.testing.assert_array_equal(
        ranks_of_sources(scores, train_ids, test_ids, single),
        ranks_of_sources(scores, train_ids, test_ids, listed_once),
    )


def test_a_list_of_sources_keeps_its_scored_ids_and_refuses_an_unknown_one(capsys):
    assert source_ids(["t1", "t1", "t3"]) == ["t1", "t3"]
    assert source_ids("t2") == ["t2"] and source_ids(None) == source_ids([]) == []
    train_rows = {t: {} for t in [*TRAIN_IDS, "gone"]}  # "gone": skipped at extraction
    test_rows = {"a": {"related": ["t1", "gone"]}, "b": {"related": ["gone"]}, "c": {}}
    found = find_sources(test_rows, train_rows, score_dir(np.zeros((3, 7)), list("abc")), "related")
    assert found == {"a": ["t1"]}
    err = capsys.readouterr().err
    assert "test example 'b' has no scores (skipped at extraction): left out" in err
    assert "'c' has no 'related'" in err
    test_rows["a"]["related"] = ["t1", "t99"]
    with pytest.raises(UserError, match="'t99'"):
        find_sources(test_rows, train_rows, score_dir(np.zeros((3, 7)), list("abc")), "related")


CORPUS = [
    "Reverse a string in Python with a slice and a negative step.",
    "Count orders per customer in SQL with GROUP BY and COUNT.",
    "A fifteen percent tip on a restaurant bill of 240 dollars is 36 dollars.",
    "Boil pasta in salted water, then drain the pasta and add sauce.",
    "The string method split breaks a sentence into words.",
]
QUERIES = ["python string slice", "sql customer orders count", "pasta sauce water tip"]


def lucene_bm25(corpus: list[list[str]], query: list[str], k1=1.5, b=0.75) -> np.ndarray:
    """BM25 as Lucene defines it, written out: idf = log(1 + (N - df + 0.5) / (df + 0.5)),
    term weight tf / (tf + k1 (1 - b + b |d| / avgdl))."""
    n, avgdl = len(corpus), np.mean([len(d) for d in corpus])
    scores = np.zeros(n)
    for word in query:
        df = sum(word in d for d in corpus)
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for j, doc in enumerate(corpus):
            tf = doc.count(word)
            scores[j] += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
    return scores


def test_bm25_scores_match_the_lucene_formula_and_the_librarys_own_retrieval():
    got = bm25_scores(CORPUS, QUERIES)
    words = bm25s.tokenize(CORPUS, stopwords="en", return_ids=False, show_progress=False)
    queries = bm25s.tokenize(QUERIES, stopwords="en", return_ids=False, show_progress=False)
    for row, query in zip(got, queries, strict=True):
        np.testing.assert_allclose(row, lucene_bm25(words, query), rtol=1e-5)
    index = bm25s.BM25()
    index.index(words, show_progress=False)
    best, _ = index.retrieve(queries, k=1, show_progress=False)
    assert best[:, 0].tolist() == got.argmax(1).tolist() == [0, 1, 3]


def test_test_example_without_source_is_left_out_with_a_warning(capsys):
    test_rows = {"a": {"source_id": "t1"}, "b": {}, "c": {"source_id": "t2"}}
    train_rows = {t: {} for t in TRAIN_IDS}
    sources = find_sources(
        test_rows, train_rows, score_dir(np.zeros((3, 7)), list("abc")), "source_id"
    )
    assert sources == {"a": ["t1"], "c": ["t2"]}
    assert "test example 'b' has no 'source_id'" in capsys.readouterr().err


# --- end to end on a tiny model: --target hidden, scoring, compare_projections.py --retrieval ---


def toy_rows() -> list[dict]:
    return conversations(13, long_every=5)  # ex_004 and ex_009 are too long for MAX_LEN


def source_rows(sources: dict[str, str | None]) -> list[dict]:
    by_id = {r["id"]: r for r in toy_rows()}
    rows = []
    for test_id, source in sources.items():
        row = {"id": test_id, "messages": by_id[source or "ex_000"]["messages"]}
        rows.append(row | ({"source_id": source} if source else {}))
    return rows


def extract(model, dataset, split, out, *extra):
    argv = [str(model), str(dataset), "0", "--dataset_split", split, "--gradients_output_path",
            str(out), "--max_seq_length", str(MAX_LEN), *extra]  # fmt: skip
    assert extract_main(argv) == 0


def run_path(out, variant, model, dataset, split):
    return out / variant / model.name / dataset.stem / split / "0"


@pytest.fixture(scope="module")
def tiny_study(tiny_llama, tmp_path_factory):
    """Gradients (full, rademacher_16), hidden states and their scores for a tiny test set."""
    root = tmp_path_factory.mktemp("retrieval")
    train = write_jsonl(root / "train.jsonl", toy_rows())
    sources = {"q_0": "ex_000", "q_1": "ex_001", "q_2": "ex_002", "q_3": "ex_006"}
    test = write_jsonl(root / "test.jsonl", source_rows(sources))
    grads, scores = root / "gradients", root / "scores"
    for dataset, split in ((train, "train"), (test, "test")):
        extract(tiny_llama, dataset, split, grads, "--random_projection", "--proj_dim", "full,16")
        extract(tiny_llama, dataset, split, grads, "--target", "hidden")
    for variant in ("full", "rademacher_16", "hidden"):
        argv = ["--train", str(run_path(grads, variant, tiny_llama, train, "train")),
                "--test", str(run_path(grads, variant, tiny_llama, test, "test")),
                "--func", "both", "--output", str(scores / variant)]  # fmt: skip
        assert score_main(argv) == 0
    return root, train, test, scores


def test_hidden_state_target_matches_the_models_own_last_hidden_state(tiny_llama, tiny_study):
    root, train, *_ = tiny_study
    run = store.Run(run_path(root / "gradients", "hidden", tiny_llama, train, "train"))
    ids, vectors = run.load_matrix()
    assert run.kind == "hidden" and vectors.shape == (len(ids), 32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data.ensure_chat_template(tokenizer)
    rows = data.load_split(str(train), "train")
    for entry, vector in zip(run.manifest.examples, vectors, strict=True):
        ex = data.tokenize(tokenizer, rows[entry["index"]], entry["index"], "sft", MAX_LEN)
        with torch.no_grad():
            out = model(torch.tensor([ex.input_ids]), output_hidden_states=True)
        want = out.hidden_states[-1][0].double().mean(0)
        assert (vector.double() - want).norm() / want.norm() < 1e-5


def test_hidden_target_refuses_a_projection(tiny_llama, sft_file, tmp_path, capsys):
    argv = [str(tiny_llama), str(sft_file), "0", "--target", "hidden", "--random_projection",
            "--gradients_output_path", str(tmp_path)]  # fmt: skip
    line = user_error_line(extract_main, argv, capsys)
    assert "--target hidden" in line and "--random_projection" in line


def compare(tiny_study, tmp_path, *extra):
    _, _, _, scores = tiny_study
    return ["--reference", str(scores / "full"), "--candidates", str(scores / "rademacher_16"),
            "--output", str(tmp_path / "report"), "--n_bootstrap", "200", "--n_permutations",
            "20", *extra]  # fmt: skip


def test_compare_writes_the_retrieval_table_report_and_figure(tiny_study, tmp_path):
    root, *_, scores = tiny_study
    argv = compare(tiny_study, tmp_path, "--retrieval_methods", str(scores / "hidden"))
    assert compare_main(argv) == 0
    table = pd.read_csv(tmp_path / "report" / "retrieval.csv")
    assert list(table.method) == ["embeddings full"] * 2 + ["embeddings rademacher_16"] * 2 + [
        "hidden state (mean)"
    ] * 2 + ["bm25", "random"]
    assert (table.n_test == 4).all()
    for stat in ("top1", "top5", "mrr"):
        assert (
            (table[f"{stat}_ci_low"] <= table[stat]) & (table[stat] <= table[f"{stat}_ci_high"])
        ).all()
    # test examples are verbatim copies of their sources: the cosine of hidden states is 1
    exact = table.set_index(["method", "function"])
    assert exact.loc[("hidden state (mean)", "cosine"), "top1"] == 1.0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Retrieval of each test example's known source" in report
    assert (tmp_path / "report" / "retrieval.png").is_file()


def test_source_that_names_no_train_example_is_an_error(tiny_study, tmp_path, capsys):
    root, train, test, scores = tiny_study
    rows = source_rows({"q_0": "ex_000", "q_1": "ex_001", "q_2": "ex_002", "q_3": "ex_006"})
    rows[2]["source_id"] = "ex_999"
    write_jsonl(test, rows)  # same ids and texts: only the source changes
    try:
        line = user_error_line(compare_main, compare(tiny_study, tmp_path, "--retrieval"), capsys)
    finally:
        rows[2]["source_id"] = "ex_002"
        write_jsonl(test, rows)
    assert "'q_2'" in line and "'ex_999'" in line
    assert not (tmp_path / "report").exists()


def test_compare_of_dot_only_scorings_writes_its_report(tiny_llama, tiny_study, tmp_path):
    """Dot alone and no runs' norms: no JL prediction to make, and the report says so."""
    root, train, test, _ = tiny_study
    scores = {}
    for variant in ("full", "rademacher_16"):
        scores[variant] = tmp_path / variant
        argv = ["--train", str(run_path(root / "gradients", variant, tiny_llama, train, "train")),
                "--test", str(run_path(root / "gradients", variant, tiny_llama, test, "test")),
                "--func", "dot", "--output", str(scores[variant])]  # fmt: skip
        assert score_main(argv) == 0
    argv = ["--reference", str(scores["full"]), "--candidates", str(scores["rademacher_16"]),
            "--output", str(tmp_path / "report"), "--n_bootstrap", "50",
            "--n_permutations", "10"]  # fmt: skip
    assert compare_main(argv) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "dot-product prediction skipped" in report
    assert pd.read_csv(tmp_path / "report" / "theory_vs_measured.csv").empty
