"""The linear datamodeling score: against scipy's spearmanr, on planted and random scores, its
bootstrap CI, and `gradproj compare --lds` end to end on a tiny model's ground truth."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from gradproj.analysis.lds import aligned_scores, lds_statistics, per_test_lds
from gradproj.cli import compare_main, main
from gradproj.scoredir import ScoreDir
from gradproj.truth import GroundTruth, load_ground_truth
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


# --- the best method against every other: lds_pairs.csv and the report's words ---


def brute_force_pair(best: np.ndarray, other: np.ndarray, n_resamples: int, seed: int):
    """Mean difference, percentile CI of test examples resampled one at a time, wins."""
    both = np.isfinite(best) & np.isfinite(other)
    difference = best[both] - other[both]
    rng = np.random.default_rng(seed + 1000)  # another stream than the code's
    means = [difference[rng.integers(0, difference.size, difference.size)].mean()
             for _ in range(n_resamples)]  # fmt: skip
    return difference.mean(), np.quantile(means, [0.025, 0.975]), int((difference > 0).sum())


def test_pairs_match_a_brute_force_paired_bootstrap_and_the_word_follows_the_ci():
    from types import SimpleNamespace

    from gradproj.analysis.lds import lds_pairs
    from gradproj.analysis.report import lds_summary, standing

    rng = np.random.default_rng(3)
    common = rng.normal(0.5, 0.2, size=60)
    best = common + 0.1 + rng.normal(0, 0.05, size=60)  # ahead of `behind`, by a margin
    noise = rng.normal(0, 0.1, size=60)
    level = best + noise - noise.mean() - 0.005  # level: differs by noise alone
    behind = common.copy()
    behind[7] = np.nan  # undefined for one test example: left out of that pair only
    per_test = [behind, best, level]
    table = pd.DataFrame({"method": ["behind", "best", "level"], "function": ["dot"] * 3,
                          "lds": [np.nanmean(v) for v in per_test], "precondition": "none",
                          "damping": None, "lds_ci_low": 0.0, "lds_ci_high": 1.0,
                          "target": "x"})  # fmt: skip
    assert table.lds.idxmax() == 1
    pairs = lds_pairs(table, per_test, n_bootstrap=4000, seed=0).set_index("other")
    assert list(pairs.index) == ["behind", "level"] and (pairs.best == "best").all()
    for name, values in (("behind", behind), ("level", level)):
        mean, (low, high), wins = brute_force_pair(best, values, 4000, 0)
        row = pairs.loc[name]
        assert row.difference == pytest.approx(mean, abs=1e-12)
        assert row.wins == wins and row.n_test == np.isfinite(values).sum()
        assert (row.ci_low, row.ci_high) == pytest.approx((low, high), abs=0.01)
    assert pairs.loc["behind"].ci_low > 0 and standing(pairs.loc["behind"]) == "ahead of"
    assert pairs.loc["level"].ci_low < 0 < pairs.loc["level"].ci_high
    assert standing(pairs.loc["level"]) == "level with"
    assert standing(SimpleNamespace(ci_low=-0.2, ci_high=-0.01)) == "behind"
    comparison = SimpleNamespace(lds=table, lds_pairs=pairs.reset_index())
    summary = lds_summary(comparison)
    assert "level with level (dot)" in summary and "ahead of behind (dot)" in summary


def test_halves_are_the_lds_of_each_half_of_the_subsets():
    from gradproj.analysis.lds import half_means

    rng = np.random.default_rng(4)
    masks, losses, effects = planted(rng, n_subsets=20, noise=2.0)
    truth = GroundTruth(None, masks, losses, losses[0], [], [], {})
    halves = half_means(truth, effects)
    first = per_test_lds(masks[:10], losses[:10], effects)
    second = per_test_lds(masks[10:], losses[10:], effects)
    assert halves == pytest.approx({"lds_half1": first.mean(), "lds_half2": second.mean()})


@pytest.fixture(scope="module")
def gram_scores(tiny_study, tmp_path_factory):
    """The tiny study's rademacher_16 runs scored again, whitened by their Gram."""
    from gradproj.cli import score_main
    from gradproj.scoredir import load_score_dir

    plain = load_score_dir(tiny_study[3] / "rademacher_16")
    out = tmp_path_factory.mktemp("gram") / "rademacher_16_gram"
    argv = ["--train", plain.summary["train_run"], "--test", plain.summary["test_run"],
            "--func", "both", "--output", str(out), "--precondition", "gram"]  # fmt: skip
    assert score_main(argv) == 0
    return out


def test_a_gram_scoring_never_shares_the_label_of_the_plain_one(
    tiny_study, tiny_truth, gram_scores, tmp_path
):
    from tests.test_explanations import embedded

    argv = compare(tiny_study, tmp_path, "--retrieval_methods", str(gram_scores),
                   "--lds", str(tiny_truth))  # fmt: skip
    assert compare_main(argv) == 0
    report = tmp_path / "report"
    plain, gram = "embeddings rademacher_16", "embeddings rademacher_16 · gram"
    for name in ("lds.csv", "retrieval.csv"):
        table = pd.read_csv(report / name)
        rows = table[table.method.str.startswith(plain) & ~table.method.str.endswith("bm25")]
        assert sorted(set(zip(rows.method, rows.precondition, strict=True))) == [
            (plain, "none"),
            (gram, "gram"),
        ], name
        assert (rows[rows.method == gram].damping == 1.0).all()
        assert rows[rows.method == plain].damping.isna().all()
    metrics = pd.read_csv(report / "metrics.csv")
    assert {"precondition", "damping"} <= set(metrics.columns)
    page = embedded((report / "explanations.html").read_text())
    labels = [m["label"] for m in page["methods"]]
    assert plain in labels and gram in labels
    lds = pd.read_csv(report / "lds.csv")
    best = [max(m["lds"].values()) for m in page["methods"]]
    assert best == sorted(best, reverse=True)  # best first
    first = page["methods"][0]["lds"]
    assert first[page["function"]] == max(first.values())  # opens on the best's function
    assert max(first.values()) == pytest.approx(lds[lds.method.isin(labels)].lds.max(), abs=1e-4)
    pairs = pd.read_csv(report / "lds_pairs.csv")
    assert len(pairs) == len(lds) - 1 and (pairs.best == lds.method[lds.lds.idxmax()]).all()


# --- ground truths that cannot judge the scores: exit 2 before any output ---


def rewritten(truth_path, tmp_path, change) -> str:
    """A copy of the ground truth with `change(tensors, info)` applied."""
    import json

    import torch
    from safetensors import safe_open

    from gradproj import fsio

    with safe_open(str(truth_path), "pt") as f:
        info = json.loads(f.metadata()[fsio.METADATA_KEY])
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    change(tensors, info)
    out = tmp_path / "changed.safetensors"
    fsio.write_safetensors({k: torch.as_tensor(v) for k, v in tensors.items()}, out, info)
    return str(out)


def set_loss(value, where=(0, 1)):
    def change(tensors, info):
        tensors["losses"][where] = value

    return change


CHANGES = {
    "max_seq_length": (lambda t, i: i["settings"].update(max_seq_length=99),
                       "max_seq_length 99 vs 40"),
    "checkpoint": (lambda t, i: i.update(checkpoint="other-model"), "checkpoint 'other-model'"),
    "nan loss": (set_loss(float("nan")), "has loss nan after subset 0"),
    "inf loss": (set_loss(float("inf")), "has loss inf after subset 0"),
    "all nan": (set_loss(float("nan"), slice(None)), "has loss nan"),
    "duplicate train id": (lambda t, i: i["train_ids"].__setitem__(1, i["train_ids"][0]),
                           "lists train example 'ex_000' twice"),
    "constant masks": (lambda t, i: t["masks"].copy_(t["masks"][:1].expand_as(t["masks"])),
                       "has 1 distinct subset(s) of 6"),
    "one subset": (lambda t, i: t.update(masks=t["masks"][:1], losses=t["losses"][:1]),
                   "has 1 distinct subset(s) of 1"),
}  # fmt: skip


@pytest.mark.parametrize("case", CHANGES)
def test_a_ground_truth_that_cannot_judge_is_exit_2_before_any_output(
    tiny_study, tiny_truth, tmp_path, capsys, case
):
    change, expected = CHANGES[case]
    bad = rewritten(tiny_truth, tmp_path, change)
    line = user_error_line(compare_main, compare(tiny_study, tmp_path, "--lds", bad), capsys)
    assert expected in line
    assert not (tmp_path / "report").exists()


def test_the_lds_figure_draws_tables_without_dims_or_with_undefined_values(tmp_path):
    from gradproj.analysis.figures import lds_figure

    table = pd.DataFrame({"method": ["hidden state (mean)", "bm25"], "function": ["cosine", "bm25"],
                          "n_test": [4, 4], "lds": [np.nan, 0.5], "lds_ci_low": [np.nan, 0.4],
                          "lds_ci_high": [np.nan, 0.6], "target": ["hidden", "bm25"],
                          "projection": ["full", None], "dim": [None, None],
                          "precondition": ["none", "none"]})  # fmt: skip
    assert lds_figure(table, tmp_path / "lds.png").is_file()
    full = table.assign(target=["embeddings", "bm25"], lds=[0.1, 0.5])
    assert lds_figure(full, tmp_path / "full.png").is_file()


def test_the_fused_ranking_is_the_sum_of_z_scores_of_the_best_whitened_method_and_bm25():
    from gradproj.analysis.lds import Method, fused_method

    rng = np.random.default_rng(5)
    masks, losses, effects = planted(rng, noise=1.0)
    truth = GroundTruth(None, masks, losses, losses[0], [], [], {})
    good = effects + 0.1 * rng.normal(size=effects.shape)
    poor = rng.normal(size=effects.shape)
    bm25 = 3 * effects + 5 + rng.normal(size=effects.shape)
    methods = [Method("a · gram", "dot", "params", "kronecker", 4, "gram", 1.0, poor),
               Method("b · gram", "dot", "params", "kronecker", 4, "gram", 1.0, good),
               Method("bm25", "bm25", "bm25", None, None, "none", None, bm25)]  # fmt: skip
    (fused,) = fused_method(truth, methods)
    assert (fused.method, fused.target, fused.precondition) == ("b · gram + bm25", "fused", "gram")
    z = [(m - m.mean(1, keepdims=True)) / m.std(1, keepdims=True) for m in (good, bm25)]
    np.testing.assert_allclose(fused.scores, z[0] + z[1], rtol=1e-12)
    assert fused_method(truth, methods[2:]) == []  # nothing whitened: no fused row
