"""gradproj.analysis: each metric and statistic against an independent reference."""

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from safetensors.numpy import save_file

from gradproj.analysis import (
    CompareConfig,
    align_to,
    bootstrap_median_ci,
    compare_projections,
    jl_cosine_std,
    jl_dot_std,
    kendall_tau_b,
    median_difference_permutation_test,
    ndcg_at_k,
    ndcg_original,
    norm_products_from_scores,
    predicted_kendall,
    spearman_rho,
    top_k_overlap,
)
from gradproj.analysis import compare as compare_module
from gradproj.analysis.original import GradientPair
from gradproj.errors import UserError
from gradproj.projection import make_projection
from gradproj.scoredir import SCORES_FORMAT, load_score_dir
from gradproj.store import ShardRecord, merge_manifest, write_shard


# ---------------------------------------------------------------- helpers
def tied_scores(rng, shape, levels=6):
    """Scores with many ties (few distinct values), to exercise tie handling."""
    return rng.integers(0, levels, size=shape).astype(float)


def rademacher(rng, k, d):
    return rng.choice([-1.0, 1.0], size=(k, d)) / math.sqrt(k)


def all_scores(test, train):
    dot = test @ train.T
    cos = dot / np.outer(np.linalg.norm(test, axis=1), np.linalg.norm(train, axis=1))
    return {"dot": dot.astype(np.float32), "cosine": cos.astype(np.float32)}


def write_score_dir(path, scores, train_ids, test_ids, projection):
    """A score directory as score_influence.py writes it (docs/formats.md)."""
    path.mkdir(parents=True)
    info = {"format": SCORES_FORMAT, "train_ids": train_ids, "test_ids": test_ids}
    metadata = {"gradproj": json.dumps(info)}
    save_file(
        {k: np.ascontiguousarray(v) for k, v in scores.items()},
        str(path / "scores.safetensors"),
        metadata=metadata,
    )
    manifest = {
        "projection": projection,
        "kind": "projected" if projection else "full",
        "model": "synthetic",
        "target": "embeddings",
    }
    summary = {"format": SCORES_FORMAT, "train_manifest": manifest, "test_manifest": manifest,
               "functions": list(scores)}  # fmt: skip
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def score_dirs(tmp_path):
    """Full scores of random gradients and Rademacher projections at k = 16, 64 (ids shuffled)."""
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(40, 300)), rng.normal(size=(6, 300)) + 0.3
    train_ids = [f"train{i}" for i in range(40)]
    test_ids = [f"test{i}" for i in range(6)]
    full = write_score_dir(tmp_path / "full", all_scores(test, train), train_ids, test_ids, None)
    candidates = []
    for k in (16, 64):
        p = rademacher(rng, k, 300)
        perm = rng.permutation(40)  # stored in another train order: alignment must undo it
        scores = {n: s[:, perm] for n, s in all_scores(test @ p.T, train @ p.T).items()}
        candidates.append(
            write_score_dir(
                tmp_path / f"rademacher_{k}",
                scores,
                [train_ids[j] for j in perm],
                test_ids,
                {"type": "rademacher", "dim": k, "seed": 42},
            )
        )
    return full, candidates


# ---------------------------------------------------------------- metrics
def test_kendall_matches_scipy_tau_b_with_ties():
    rng = np.random.default_rng(1)
    ref, cand = tied_scores(rng, (5, 50)), tied_scores(rng, (5, 50))
    pairs = zip(ref, cand, strict=True)
    expected = [scipy.stats.kendalltau(r, c, variant="b").statistic for r, c in pairs]
    np.testing.assert_allclose(kendall_tau_b(ref, cand), expected, rtol=1e-12)


def test_kendall_identical_is_one_and_reversed_is_minus_one():
    x = np.random.default_rng(2).normal(size=(3, 30))
    np.testing.assert_allclose(kendall_tau_b(x, x), 1.0)
    np.testing.assert_allclose(kendall_tau_b(x, -x), -1.0)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(3)
    ref, cand = tied_scores(rng, (5, 50)), tied_scores(rng, (5, 50))
    expected = [scipy.stats.spearmanr(r, c).statistic for r, c in zip(ref, cand, strict=True)]
    np.testing.assert_allclose(spearman_rho(ref, cand), expected, rtol=1e-12)


def test_spearman_reversed_is_minus_one():
    x = np.random.default_rng(4).normal(size=(2, 20))
    np.testing.assert_allclose(spearman_rho(x, -x), -1.0)


def brute_top_k(row, k):
    """k highest scores, ties broken by the lower train index."""
    return set(sorted(range(len(row)), key=lambda j: (-row[j], j))[:k])


def test_top_k_overlap_matches_set_intersection():
    rng = np.random.default_rng(5)
    ref, cand = rng.normal(size=(4, 60)), rng.normal(size=(4, 60))
    pairs = zip(ref, cand, strict=True)
    expected = [len(brute_top_k(r, 10) & brute_top_k(c, 10)) / 10 for r, c in pairs]
    np.testing.assert_allclose(top_k_overlap(ref, cand, 10), expected)


def brute_dcg(relevance, candidate, k):
    order = sorted(range(len(candidate)), key=lambda j: (-candidate[j], j))[:k]
    return sum(relevance[j] / math.log2(p + 2) for p, j in enumerate(order))


def brute_descending_rank(row):
    """0-based rank from the top, ties averaged, by counting."""
    return np.array([(row > x).sum() + ((row == x).sum() - 1) / 2 for x in row])


def test_ndcg_at_k_matches_its_definition():
    rng = np.random.default_rng(6)
    ref, cand = tied_scores(rng, (3, 40), levels=15), rng.normal(size=(3, 40))
    expected = []
    for r, c in zip(ref, cand, strict=True):
        relevance = len(r) - brute_descending_rank(r)
        ideal = sum(sorted(relevance, reverse=True)[p] / math.log2(p + 2) for p in range(10))
        expected.append(brute_dcg(relevance, c, 10) / ideal)
    np.testing.assert_allclose(ndcg_at_k(ref, cand, 10), expected, rtol=1e-12)


def test_ndcg_original_matches_its_definition():
    rng = np.random.default_rng(7)
    ref, cand = rng.normal(size=(3, 30)), rng.normal(size=(3, 30))
    expected = []
    for r, c in zip(ref, cand, strict=True):
        relevance = 1 / (brute_descending_rank(r) + 1)
        expected.append(brute_dcg(relevance, c, 30) / brute_dcg(relevance, r, 30))
    np.testing.assert_allclose(ndcg_original(ref, cand), expected, rtol=1e-12)


def test_ndcg_of_identical_ranking_with_ties_is_one():
    ref = tied_scores(np.random.default_rng(8), (3, 40))
    np.testing.assert_allclose(ndcg_at_k(ref, ref, 10), 1.0)
    np.testing.assert_allclose(ndcg_original(ref, ref), 1.0)


# ---------------------------------------------------------------- statistics
def test_permutation_test_is_reproducible_with_a_seed():
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=30), rng.normal(0.3, size=30)
    first = median_difference_permutation_test(a, b, seed=5)
    assert first == median_difference_permutation_test(a, b, seed=5)


def test_permutation_test_matches_exact_p_value():
    a, b = np.array([0.1, 0.5, 0.9, 1.4, 2.0]), np.array([1.2, 1.9, 2.4, 3.0, 3.3, 3.1])
    exact = scipy.stats.permutation_test(
        (a, b),
        lambda x, y: np.median(x) - np.median(y),
        permutation_type="independent",
        n_resamples=np.inf,
    ).pvalue
    result = median_difference_permutation_test(a, b, n_permutations=4000, seed=0)
    assert result.median_difference == pytest.approx(np.median(a) - np.median(b))
    # Monte Carlo error of a p of ~0.05 with 4000 permutations: sd ~0.0035.
    assert result.p_value == pytest.approx(exact, abs=0.015)


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    values = np.random.default_rng(10).exponential(size=200)
    expected = scipy.stats.bootstrap(
        (values,), np.median, method="percentile", n_resamples=4000, random_state=1
    ).confidence_interval
    low, high = bootstrap_median_ci(values, n_resamples=4000, seed=2)
    assert low == pytest.approx(expected.low, abs=0.05)
    assert high == pytest.approx(expected.high, abs=0.05)


# ---------------------------------------------------------------- JL theory
@pytest.fixture(scope="module")
def projected_pair():
    """<Pa, Pb> and the projected cosine for 3000 independent Rademacher P (k=32, D=400)."""
    rng = np.random.default_rng(11)
    a = rng.normal(size=400)
    b = 0.6 * a + rng.normal(size=400) * 1.5
    dots, cosines = [], []
    for _ in range(3000):
        pa, pb = np.stack([a, b]) @ rademacher(rng, 32, 400).T
        dots.append(pa @ pb)
        cosines.append(pa @ pb / (np.linalg.norm(pa) * np.linalg.norm(pb)))
    return a, b, np.array(dots), np.array(cosines)


def test_jl_dot_std_matches_monte_carlo(projected_pair):
    a, b, dots, _ = projected_pair
    predicted = jl_dot_std(np.linalg.norm(a) * np.linalg.norm(b), a @ b, 32)
    assert np.std(dots) == pytest.approx(predicted, rel=0.1)


def test_jl_cosine_std_matches_monte_carlo(projected_pair):
    a, b, _, cosines = projected_pair
    predicted = jl_cosine_std(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), 32)
    assert np.std(cosines) == pytest.approx(predicted, rel=0.1)


@pytest.mark.parametrize("function", ["dot", "cosine"])
def test_predicted_kendall_matches_projected_kendall(function):
    """Independent noise ignores the correlation through the shared test vector: close at k >> 1."""
    rng = np.random.default_rng(12)
    train, test = rng.normal(size=(80, 500)), rng.normal(size=(20, 500)) + 0.5
    full = all_scores(test, train)
    measured = []
    for _ in range(3):
        p = rademacher(rng, 512, 500)
        projected = all_scores(test @ p.T, train @ p.T)
        measured.append(np.median(kendall_tau_b(full[function], projected[function])))
    norm_product = np.outer(np.linalg.norm(test, axis=1), np.linalg.norm(train, axis=1))
    predicted = predicted_kendall(function, full[function].astype(float), 512, norm_product)
    assert np.median(predicted) == pytest.approx(np.mean(measured), rel=0.1)


def test_norm_products_recovered_from_dot_and_cosine():
    rng = np.random.default_rng(13)
    train, test = rng.normal(size=(30, 50)), rng.normal(size=(5, 50))
    scores = all_scores(test, train)
    expected = np.outer(np.linalg.norm(test, axis=1), np.linalg.norm(train, axis=1))
    recovered = norm_products_from_scores(scores["dot"].astype(float), scores["cosine"])
    np.testing.assert_allclose(recovered, expected, rtol=1e-4)


# ---------------------------------------------------------------- score directories and report
def test_alignment_reorders_candidate_to_reference_ids(score_dirs):
    full, candidates = score_dirs
    ref, cand = load_score_dir(full), load_score_dir(candidates[0])
    aligned = align_to(ref, cand)
    j = cand.train_ids.index(ref.train_ids[0])
    np.testing.assert_array_equal(aligned.scores["dot"][:, 0], cand.scores["dot"][:, j])


def test_different_id_sets_are_refused(tmp_path, score_dirs):
    full, _ = score_dirs
    other = write_score_dir(
        tmp_path / "other",
        {"dot": np.zeros((6, 40), np.float32)},
        [f"x{i}" for i in range(40)],
        [f"test{i}" for i in range(6)],
        None,
    )
    with pytest.raises(UserError, match="different train_ids"):
        align_to(load_score_dir(full), load_score_dir(other))


def test_nan_scores_are_refused_naming_the_example(tmp_path):
    scores = np.ones((2, 3), np.float32)
    scores[1, 2] = np.nan
    path = write_score_dir(tmp_path / "nan", {"cosine": scores}, ["a", "b", "c"], ["q", "r"], None)
    with pytest.raises(UserError, match="test example 'r' and train example 'c'"):
        load_score_dir(path)


def test_report_and_figures_from_synthetic_score_dirs(tmp_path, score_dirs):
    full, candidates = score_dirs
    config = CompareConfig(
        full, candidates, tmp_path / "out", top_ks=(10,), n_permutations=50, n_bootstrap=50
    )
    comparison = compare_projections(config)
    out = tmp_path / "out"
    for name in (
        "metrics.csv",
        "summary.csv",
        "report.md",
        "agreement_vs_dim.png",
        "dot_vs_cosine.png",
        "violin_kendall_tau.png",
    ):
        assert (out / name).stat().st_size > 0, name
    # 2 candidates x 2 functions + 3 directories dot-vs-cosine, 6 tests, 5 metrics each.
    assert len(comparison.metrics) == (2 * 2 + 3) * 6 * 5
    report = (out / "report.md").read_text()
    assert all(f"]({p.name})" in report for p in comparison.figures)


def test_report_opens_with_a_summary_naming_the_excluded_examples(tmp_path, score_dirs):
    full, candidates = score_dirs
    summary = json.loads((full / "summary.json").read_text())
    reason = "no label token within max_seq_length=256"
    summary["excluded"] = {
        "train": [{"id": f"gone{i}", "index": 50 + i, "reason": reason} for i in range(2)],
        "test": [],
    }
    (full / "summary.json").write_text(json.dumps(summary))
    config = CompareConfig(
        full, candidates, tmp_path / "out", top_ks=(10,), n_permutations=20, n_bootstrap=50
    )
    comparison = compare_projections(config)
    report = (tmp_path / "out" / "report.md").read_text()
    opening = report.split("## Summary\n", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    assert 1 <= len(opening) <= 10
    assert any(f"2 train example(s) for {reason} (gone0, gone1)" in line for line in opening)
    # the agreement line is written from the numbers of the table below it
    measured = comparison.summary[
        (comparison.summary.comparison == "reference")
        & (comparison.summary.metric == "kendall_tau")
        & (comparison.summary.function == "dot")
    ].sort_values("dim")
    cells = zip(measured["median"], measured.dim, strict=True)
    values = ", ".join(f"{m:.2f} at {d:,}" for m, d in cells)
    assert any(f"dot (rademacher) {values}" in line for line in opening)


def test_measured_agreement_is_close_to_the_jl_prediction(tmp_path, score_dirs):
    full, candidates = score_dirs
    comparison = compare_projections(
        CompareConfig(
            full, candidates, tmp_path / "out", top_ks=(10,), n_permutations=20, n_bootstrap=50
        )
    )
    assert not comparison.theory_vs_measured.flagged.any()


def write_full_run(path, ids, rows, max_seq_length):
    """A full-gradient run directory as extract_gradients.py writes it (docs/formats.md)."""
    path.mkdir(parents=True)
    examples = [
        {
            "index": i,
            "id": x,
            "tokens": len(r),
            "label_tokens": len(r),
            "grad_norm": float(r.norm()),
        }
        for i, (x, r) in enumerate(zip(ids, rows, strict=True))
    ]
    tensors = {
        "values": torch.cat(rows),
        "index": torch.arange(len(rows)),
        "offsets": torch.tensor([0, *np.cumsum([len(r) for r in rows])]),
    }
    entry = write_shard(path, 0, len(rows), tensors, ShardRecord(examples, []))
    header = {
        "kind": "full",
        "target": "embeddings",
        "model": "synthetic",
        "checkpoint": "0",
        "dataset": "synthetic",
        "split": "train",
        "projection": None,
        "hidden_size": rows[0].shape[1],
        "max_seq_length": max_seq_length,
        "options": {"gradients_per_file": 1000},
        "shard_size": 1000,
        "versions": {},
    }
    merge_manifest(path, header, len(rows), 1000, {entry["file"]: entry})
    return path


def emulation_config(tmp_path, **options) -> CompareConfig:
    """Full runs of ragged random gradients, their full and projected score directories."""
    rng = torch.Generator().manual_seed(15)
    shape = (6, 8)
    train = [torch.randn(int(n), 8, generator=rng) for n in torch.randint(1, 7, (30,))]
    test = [torch.randn(int(n), 8, generator=rng) + 0.2 for n in torch.randint(1, 7, (4,))]
    train_ids, test_ids = [f"t{i}" for i in range(30)], [f"q{i}" for i in range(4)]
    train_run = write_full_run(tmp_path / "train_run", train_ids, train, shape[0])
    test_run = write_full_run(tmp_path / "test_run", test_ids, test, shape[0])
    pair = GradientPair(train_ids, train, test_ids, test, shape[0])
    full = write_score_dir(
        tmp_path / "full",
        all_scores(pair.dense(test).double().numpy(), pair.dense(train).double().numpy()),
        train_ids,
        test_ids,
        None,
    )
    projected = make_projection("rademacher", [16, 32], 42, shape).project_batch
    test_proj, train_proj = projected(test), projected(train)
    candidates = [
        write_score_dir(
            tmp_path / f"rademacher_{k}",
            all_scores(test_proj[k].double().numpy(), train_proj[k].double().numpy()),
            train_ids,
            test_ids,
            {"type": "rademacher", "dim": k, "seed": 42},
        )
        for k in (16, 32)
    ]
    options = dict(top_ks=(10,), n_permutations=20, n_bootstrap=50) | options
    return CompareConfig(
        full,
        candidates,
        tmp_path / "out",
        reference_run=train_run,
        test_run=test_run,
        emulate_original=True,
        **options,
    )


@pytest.mark.slow
def test_emulation_without_steps_reproduces_measured_agreement(tmp_path):
    """The ablation's `none` row recomputes the candidates' projection from the full runs."""
    comparison = compare_projections(emulation_config(tmp_path))
    none = comparison.ablation[comparison.ablation.variant == "none"]
    measured = comparison.summary[
        (comparison.summary.metric == "kendall_tau")
        & (comparison.summary.comparison == "reference")
    ]
    merged = none.merge(measured, on=["function", "dim"])
    np.testing.assert_allclose(merged.kendall_median, merged["median"], atol=1e-6)
    assert "exact_original" in (tmp_path / "out" / "report.md").read_text()
    assert "original_curves.png" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_emulation_is_reused_until_an_input_changes(tmp_path, monkeypatch):
    emulate = compare_module.ablation_table
    calls = []
    monkeypatch.setattr(
        compare_module, "ablation_table", lambda *args: calls.append(args) or emulate(*args)
    )
    config = emulation_config(tmp_path)
    first = compare_projections(config).ablation
    report = (tmp_path / "out" / "report.md").read_text()
    again = compare_projections(config).ablation
    assert len(calls) == 1
    pd.testing.assert_frame_equal(again, first)
    assert (tmp_path / "out" / "report.md").read_text() == report
    compare_projections(dataclasses.replace(config, n_bootstrap=60))  # an option changed
    assert len(calls) == 2
    manifest = tmp_path / "test_run" / "manifest.json"  # a run changed
    manifest.write_text(manifest.read_text().replace('"synthetic"', '"synthetic "', 1))
    compare_projections(dataclasses.replace(config, n_bootstrap=60))
    assert len(calls) == 3


def test_cli_turns_bad_input_into_exit_code_2(tmp_path, capsys):
    from gradproj.cli import compare_main as main
    from gradproj.errors import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            lambda: main(
                [
                    "--reference",
                    str(tmp_path),
                    "--candidates",
                    str(tmp_path / "c"),
                    "--output",
                    str(tmp_path / "o"),
                ]
            )
        )
    assert exit_info.value.code == 2
    assert "not a score directory" in capsys.readouterr().err


def test_summary_lines_name_the_best_method_and_the_artifact_from_the_tables():
    from types import SimpleNamespace

    from gradproj.analysis.report import artifact_summary, retrieval_summary

    retrieval = pd.DataFrame(
        [
            {"method": "full", "function": "dot", "n_test": 54, "top1": 10 / 54, "mrr": 0.27},
            {"method": "full", "function": "cosine", "n_test": 54, "top1": 13 / 54, "mrr": 0.32},
            {"method": "hidden", "function": "cosine", "n_test": 54, "top1": 1.0, "mrr": 1.0},
            {"method": "bm25", "function": "bm25", "n_test": 54, "top1": 1.0, "mrr": 0.99},
        ]
    )
    ablation = pd.DataFrame(
        [
            {"variant": v, "function": f, "projection_type": "rademacher", "dim": d,
             "kendall_median": k}
            for v, f, d, k in [
                ("none", "cosine", 512, 0.28), ("exact_original", "cosine", 512, 0.16),
                ("none", "cosine", 4096, 0.58), ("exact_original", "cosine", 4096, 0.32),
                ("none", "dot", 4096, 0.57), ("exact_original", "dot", 4096, 0.57),
            ]
        ]
    )  # fmt: skip
    comparison = SimpleNamespace(retrieval=retrieval, ablation=ablation)
    assert retrieval_summary(comparison) == (
        "Finds each test example's source best: hidden (cosine), first for 54 of 54 (MRR 1.00); "
        "full (dot): 10 of 54; full (cosine): 13 of 54."
    )
    assert artifact_summary(comparison).startswith(
        "The original's artifact is present in its emulated pipeline: cosine at rademacher 4,096 "
        "dims falls from 0.58 (this project) to 0.32"
    )
    comparison.ablation = ablation.assign(kendall_median=0.5)
    assert artifact_summary(comparison).startswith("The original's artifact is absent")
