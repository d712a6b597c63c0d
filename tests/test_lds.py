"""The linear datamodeling score: against scipy's spearmanr, on planted and random scores, its
bootstrap CI, and `gradproj compare --lds` end to end on a tiny model's ground truth."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from gradproj.analysis.lds import aligned_scores, lds_statistics, per_test_lds
from gradproj.cli import compare_main, main
from gradproj.retrain import GroundTruth, load_ground_truth
from gradproj.scoredir import ScoreDir
from tests import test_retrieval
from tests.conftest import user_error_line, write_jsonl
from tests.test_retrieval import compare, toy_rows

tiny_study = test_retrieval.tiny_study  # the fixture: gradients and scores of a tiny study


def planted(rng, n_subsets=40, n_train=30, n_test=12, noise=1.0):
    """Masks of random halves, true per-example effects, and losses that follow the linear
    datamodel plus noise."""
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for s in range(n_subsets):
        masks[s, rng.choice(n_train, n_train // 2, replace=False)] = True
    effects = rng.normal(size=(n_test, n_train))
    losses = 3.0 - masks @ effects.T + noise * rng.normal(size=(n_subsets, n_test))
    return masks, losses, effects


def test_lds_matches_scipy_spearmanr_per_test_example():
    rng = np.random.default_rng(0)
    masks, losses, effects = planted(rng, noise=3.0)
    scores = effects + rng.normal(size=effects.shape)  # correlated, not equal
    scores[0] = np.round(scores[0])  # ties in the prediction
    values = per_test_lds(masks, losses, scores)
    for j in range(scores.shape[0]):
        predicted = [scores[j, masks[s]].sum() for s in range(masks.shape[0])]
        want = spearmanr(predicted, -losses[:, j]).statistic
        assert values[j] == pytest.approx(want, abs=1e-12)
    assert 0.2 < np.mean(values) < 0.95


def test_planted_scores_give_lds_near_one_and_random_scores_near_zero():
    rng = np.random.default_rng(1)
    masks, losses, effects = planted(rng, n_subsets=200, n_test=40, noise=0.0)
    assert lds_statistics(per_test_lds(masks, losses, effects))["lds"] == pytest.approx(1.0)
    noisy = lds_statistics(
        per_test_lds(masks, losses + 0.5 * rng.normal(size=losses.shape), effects)
    )
    assert noisy["lds"] > 0.9
    random = lds_statistics(per_test_lds(masks, losses, rng.normal(size=effects.shape)))
    assert abs(random["lds"]) < 0.05
    assert random["lds_ci_low"] < 0 < random["lds_ci_high"]


def test_ci_of_a_constant_lds_is_tight_and_an_undefined_correlation_is_left_out():
    rng = np.random.default_rng(2)
    masks, losses, effects = planted(rng, noise=0.0)
    losses[:, 3] = 1.0  # a test example whose loss never changes: no correlation
    values = per_test_lds(masks, losses, effects)
    assert np.isnan(values[3]) and np.isfinite(np.delete(values, 3)).all()
    row = lds_statistics(values, n_bootstrap=500)
    assert row["n_test"] == effects.shape[0] - 1
    assert row["lds"] == row["lds_ci_low"] == row["lds_ci_high"] == pytest.approx(1.0)


def test_scores_are_aligned_by_id_and_a_differing_id_is_named():
    truth = GroundTruth(None, np.ones((2, 3), bool), np.zeros((2, 2)), np.zeros(2),
                        ["a", "b", "c"], ["x", "y"], {})  # fmt: skip
    scores = np.arange(6.0).reshape(2, 3)  # rows y, x; columns c, a, b
    shuffled = ScoreDir("s", {"dot": scores}, ["c", "a", "b"], ["y", "x"], {})
    assert aligned_scores(truth, shuffled, "dot").tolist() == [[4, 5, 3], [1, 2, 0]]
    other = ScoreDir("s", {"dot": scores}, ["c", "a", "d"], ["y", "x"], {})
    with pytest.raises(Exception, match=r"train examples, first 'b' \(only in the ground truth\)"):
        aligned_scores(truth, other, "dot")


# --- end to end: a tiny model's ground truth and the tiny study of test_retrieval ---


@pytest.fixture(scope="module")
def tiny_truth(tiny_llama, tiny_study):
    root, train, test, _ = tiny_study
    out = root / "truth.safetensors"
    argv = ["retrain", "--model", str(tiny_llama), "--train_dataset", str(train),
            "--test_dataset", str(test), "--test_split", "test", "--output", str(out),
            "--max_seq_length", "40", "--n_subsets", "6", "--train_layers", "1",
            "--lr", "1e-2", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_compare_writes_lds_table_report_section_and_figure(tiny_study, tiny_truth, tmp_path):
    scores = tiny_study[3]
    argv = compare(tiny_study, tmp_path, "--retrieval_methods", str(scores / "hidden"),
                   "--lds", str(tiny_truth))  # fmt: skip
    assert compare_main(argv) == 0
    table = pd.read_csv(tmp_path / "report" / "lds.csv")
    columns = ["method", "function", "n_test", "lds", "lds_ci_low", "lds_ci_high"]
    assert list(table.columns[:6]) == columns
    assert list(table.method) == ["embeddings full"] * 2 + ["embeddings rademacher_16"] * 2 + [
        "hidden state (mean)"
    ] * 2 + ["bm25", "random"]
    assert ((table.lds_ci_low <= table.lds) & (table.lds <= table.lds_ci_high)).all()
    truth = load_ground_truth(tiny_truth)
    from gradproj.scoredir import load_score_dir

    full = load_score_dir(scores / "full")
    want = per_test_lds(truth.masks, truth.losses, aligned_scores(truth, full, "dot"))
    assert table.lds[0] == pytest.approx(np.nanmean(want))
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Which ranking is influence: linear datamodeling score" in report
    assert (tmp_path / "report" / "lds.png").is_file()


def test_ground_truth_of_other_train_examples_is_exit_2_naming_the_id(
    tiny_llama, tiny_study, tmp_path, capsys
):
    root, _, test, _ = tiny_study
    fewer = write_jsonl(tmp_path / "train.jsonl", toy_rows()[1:])
    out = tmp_path / "fewer.safetensors"
    argv = ["retrain", "--model", str(tiny_llama), "--train_dataset", str(fewer),
            "--test_dataset", str(test), "--test_split", "test", "--output", str(out),
            "--max_seq_length", "40", "--n_subsets", "2", "--train_layers", "1"]  # fmt: skip
    assert main(argv) == 0
    line = user_error_line(compare_main, compare(tiny_study, tmp_path, "--lds", str(out)), capsys)
    assert "different train examples, first 'ex_000' (only in the scores)" in line


@pytest.mark.parametrize("content", [b"", b"not safetensors at all", None])
def test_truncated_or_foreign_ground_truth_is_one_line(tiny_study, tiny_truth, tmp_path, capsys,
                                                       content):  # fmt: skip
    bad = tmp_path / "bad.safetensors"
    if content is None:  # a real safetensors file, cut short
        bad.write_bytes(tiny_truth.read_bytes()[:-20])
    else:
        bad.write_bytes(content)
    line = user_error_line(compare_main, compare(tiny_study, tmp_path, "--lds", str(bad)), capsys)
    assert "is not a gradproj ground-truth file" in line
    assert not (tmp_path / "report").exists()


def test_score_file_is_not_a_ground_truth(tiny_study, tmp_path, capsys):
    scores_file = tiny_study[3] / "full" / "scores.safetensors"
    line = user_error_line(compare_main, compare(tiny_study, tmp_path, "--lds", str(scores_file)),
                           capsys)  # fmt: skip
    assert "its format is 'gradproj-scores/1'" in line
