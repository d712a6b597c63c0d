"""The original study's pipeline (gradproj.analysis.original) and its JSON lists (original_json),
each checked against an independent, literal re-implementation of the original's code."""

import json
import math
import random

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from gradproj.analysis.original import (
    ZERO_GRADIENT_ID,
    GradientPair,
    OriginalSteps,
    ablation_variants,
    explain_scores,
    file_order_ranks,
    project_like_original,
    rank_kendall,
    run_ablation,
    with_zero_gradient,
    zero_gradient_position,
)
from gradproj.analysis.original_json import agreement_per_list, write_original_lists
from gradproj.errors import UserError
from tests.conftest import user_error_line


# ---------------------------------------------------------------- helpers
def signs(k, d, seed=0):
    """A ±1 matrix: TRAK's Rademacher projection, which leaves out 1/sqrt(k)."""
    return torch.from_numpy(np.random.default_rng(seed).choice([-1.0, 1.0], size=(k, d))).float()


def fake_projector(k, d, seed=0):
    """This project's convention: scaled by 1/sqrt(k)."""
    matrix = signs(k, d, seed) / math.sqrt(k)
    return lambda grads: {k: torch.stack([g.flatten() for g in grads]) @ matrix.T}


def gradient_pair(n_train, n_test, seed, length=4, hidden=8):
    rng = torch.Generator().manual_seed(seed)
    train = [torch.randn(length, hidden, generator=rng) for _ in range(n_train)]
    test = [torch.randn(length, hidden, generator=rng) for _ in range(n_test)]
    return GradientPair(
        [f"t{i}" for i in range(n_train)], train, [f"q{i}" for i in range(n_test)], test, length
    )


def python_sort_positions(keys: list[float], drop: int | None = None) -> dict[int, int]:
    """The original's list: dicts in dataset order, list.sort on "score", `drop` filtered out."""
    items = [{"score": s, "row": i} for i, s in enumerate(keys)]
    items.sort(key=lambda x: x["score"], reverse=True)
    return {x["row"]: p for p, x in enumerate(x for x in items if x["row"] != drop)}


def notebook_kendall(ref_positions: dict, cand_positions: dict) -> float:
    """DAP_main_results.ipynb's compute_metric: scipy's kendalltau of the positions."""
    ids = sorted(ref_positions, key=ref_positions.get)
    return scipy.stats.kendalltau(
        [ref_positions[i] for i in ids], [cand_positions[i] for i in ids]
    ).statistic


# ---------------------------------------------------------------- arithmetic
def test_fp32_normalize_keeps_a_zero_gradient_at_zero_and_fp16_makes_it_nan():
    test, train = torch.randn(2, 64), torch.randn(3, 64)
    train[1] = 0
    fp32 = explain_scores(test, train, "cosine")
    fp16 = explain_scores(test.half(), train.half(), "cosine")
    assert (fp32[:, 1] == 0).all() and np.isfinite(fp32).all()
    assert np.isnan(fp16[:, 1]).all() and np.isfinite(np.delete(fp16, 1, axis=1)).all()
    # The reference: F.normalize itself, in each dtype.
    assert (F.normalize(train[1], dim=-1) == 0).all()
    assert F.normalize(train[1].half(), dim=-1).isnan().all()


def test_fp16_elementwise_scores_round_each_product_unlike_a_half_matmul():
    """Products of 1e-4 entries (1e-8) underflow in fp16: explain.py's sum of them is 0, while a
    half matmul accumulates the exact products in fp32."""
    gen = torch.Generator().manual_seed(1)
    test = torch.full((2, 256), 1e-4).half()
    train = (torch.randint(0, 2, (3, 256), generator=gen) * 2 - 1).half() * 1e-4
    got = explain_scores(test, train, "dot")
    expected = torch.stack([torch.sum(train * row, -1) for row in test]).double().numpy()
    np.testing.assert_array_equal(got, expected)
    assert (got == 0).all()
    assert (test @ train.T).abs().min() > 0


def test_python_sort_with_one_nan_is_exact_below_64_items_and_broken_from_64():
    """Binary insertion sort below 64 items (one NaN does little); merged runs from 64 on."""
    medians = {}
    for n in (63, 64, 65):
        taus = []
        for seed in range(40):
            rnd = random.Random(seed)
            keys = [rnd.random() for _ in range(n)]
            keys[n // 2] = float("nan")
            positions = python_sort_positions(keys, drop=n // 2)
            values = sorted(positions, key=positions.get)
            # Kendall of the list order against the true descending order of the scores.
            taus.append(scipy.stats.kendalltau(range(n - 1), [-keys[j] for j in values]).statistic)
        medians[n] = np.median(taus)
    assert medians[63] > 0.98
    assert medians[64] < 0.7 and medians[65] < 0.7


def test_file_order_ranks_are_python_sort_positions_with_the_row_dropped():
    rng = np.random.default_rng(2)
    scores = rng.random((3, 100))
    scores[:, 57] = np.nan
    ranks = file_order_ranks(scores, drop=57)
    for row, got in zip(scores, ranks, strict=True):
        expected = python_sort_positions(row.tolist(), drop=57)
        assert np.isnan(got[57])
        assert all(got[j] == p for j, p in expected.items())


def test_zero_gradient_sits_at_the_originals_row():
    assert zero_gradient_position(999) == 570
    train = torch.ones(999, 3)
    stored = with_zero_gradient(train)
    assert stored.shape == (1000, 3) and (stored[570] == 0).all() and stored.sum() == 999 * 3


# ---------------------------------------------------------------- the NaN mechanism
def list_sort_taus(nan_on_candidate: bool, seed: int = 3) -> np.ndarray:
    """1,000 train rows, the zero gradient's at 570: NaN in the reference's cosine; the candidate
    either shares the NaN (with small noise elsewhere) or, as the original's fp32 projections
    did, gives it cosine 0 with no projection error at all."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(-1, 1, size=(40, 1000))
    at = zero_gradient_position(999)
    reference, candidate = truth.copy(), truth.copy()
    reference[:, at] = np.nan
    if nan_on_candidate:
        candidate += rng.normal(0, 1e-3, candidate.shape)
        candidate[:, at] = np.nan
    else:
        candidate[:, at] = 0.0
    return rank_kendall(file_order_ranks(reference, at), file_order_ranks(candidate, at))


def test_nan_on_the_reference_side_only_breaks_the_agreement():
    assert np.median(list_sort_taus(nan_on_candidate=False)) < 0.9


def test_nan_on_both_sides_keeps_the_lists_in_agreement():
    assert np.median(list_sort_taus(nan_on_candidate=True)) > 0.95


# ---------------------------------------------------------------- the ablation
def test_projection_steps_round_inputs_and_drop_the_scale():
    grads = [torch.randn(4, 8) * 1e-6 for _ in range(3)]
    project = fake_projector(16, 32)
    got = project_like_original(
        project, grads, OriginalSteps(fp16_projection_input=True, unscaled_projection=True)
    )[16]
    expected = torch.stack([g.half().float().flatten() for g in grads]) @ signs(16, 32).T
    torch.testing.assert_close(got, expected)


def test_ablation_without_steps_reproduces_the_direct_projection():
    pair = gradient_pair(25, 3, seed=14)
    project = fake_projector(16, 32)
    rows = run_ablation(pair, project, "rademacher", ("dot",), {"none": OriginalSteps()})
    full = pair.dense(pair.test_rows) @ pair.dense(pair.train_rows).T
    proj = project(pair.test_rows)[16] @ project(pair.train_rows)[16].T
    expected = [scipy.stats.kendalltau(f, p).statistic for f, p in zip(full, proj, strict=True)]
    np.testing.assert_allclose(rows[0].kendall, expected, rtol=1e-12)


def test_shared_computations_give_each_variant_what_it_gives_alone():
    """The emulation computes each side once and shares it between variants: its keys must name
    every step a side reads, so each variant's row equals that of a run of it alone."""
    pair = gradient_pair(70, 3, seed=17)
    project = fake_projector(16, 32)
    together = run_ablation(pair, project, "rademacher")
    for name, steps in ablation_variants().items():
        alone = run_ablation(pair, project, "rademacher", variants={name: steps})
        mine = [r for r in together if r.variant == name]
        assert len(mine) == len(alone)
        for a, b in zip(mine, alone, strict=True):
            np.testing.assert_array_equal(a.kendall, b.kendall, err_msg=name)
            assert (a.nan_scores, a.candidate_score_std) == (b.nan_scores, b.candidate_score_std)


def test_exact_original_is_the_original_pipeline_step_by_step():
    """exact_original against a literal transcription of the original: fp16 gradients; full side
    .half(), zero row at 570/1000, explain.py's loop; projected side TRAK (fp16 input, ±1 matrix,
    fp32 out), explain.py's loop in fp32; lists sorted by list.sort, the id dropped, positions
    compared with scipy's kendalltau."""
    pair = gradient_pair(99, 3, seed=16)
    at = zero_gradient_position(99)
    (row,) = (
        r
        for r in run_ablation(
            pair, fake_projector(16, 32), "rademacher", ("cosine",), {"x": OriginalSteps.all()}
        )
    )
    grads_fp16 = {s: pair.dense(getattr(pair, f"{s}_rows")).half() for s in ("train", "test")}
    zero = torch.zeros(1, 32, dtype=torch.float16)
    full_train = torch.cat([grads_fp16["train"][:at], zero, grads_fp16["train"][at:]])
    proj = {s: g.float() @ signs(16, 32).T for s, g in grads_fp16.items()}
    proj_train = torch.cat([proj["train"][:at], zero.float()[:, :16], proj["train"][at:]])
    full_train_normalized = F.normalize(full_train, p=2, dim=-1)
    proj_train_normalized = F.normalize(proj_train, p=2, dim=-1)
    expected = []
    for i in range(3):
        full = torch.sum(
            full_train_normalized * F.normalize(grads_fp16["test"][i], p=2, dim=-1), -1
        )
        cand = torch.sum(proj_train_normalized * F.normalize(proj["test"][i], p=2, dim=-1), -1)
        expected.append(
            notebook_kendall(
                python_sort_positions([float(s.item()) for s in full], drop=at),
                python_sort_positions([float(s.item()) for s in cand], drop=at),
            )
        )
    np.testing.assert_allclose(row.kendall, expected, rtol=1e-12)
    assert row.nan_scores == 3  # the zero gradient's, on the full side only


def test_the_nan_reaches_only_cosine_rankings_and_only_through_list_sort():
    """Above 64 train rows: the zero gradient changes nothing when ranks come from the scores, and
    nothing for dot products (no NaN), but the NaN-keyed list.sort breaks the cosine ranking."""
    pair = gradient_pair(150, 6, seed=15)
    names = ["none", "zero_gradient", "list_sort_ranks", "nan_mechanism"]
    variants = {n: ablation_variants()[n] for n in names}
    variants["no_zero"] = OriginalSteps(fp16_full_scores=True, list_sort_ranks=True)
    rows = run_ablation(pair, fake_projector(16, 32), "rademacher", ("dot", "cosine"), variants)
    tau = {(r.variant, r.function): r.kendall for r in rows}
    for function in ("dot", "cosine"):
        np.testing.assert_allclose(tau["zero_gradient", function], tau["none", function])
        np.testing.assert_allclose(tau["list_sort_ranks", function], tau["none", function])
    np.testing.assert_allclose(tau["nan_mechanism", "dot"], tau["no_zero", "dot"])
    assert np.median(tau["nan_mechanism", "cosine"]) < np.median(tau["none", "cosine"]) - 0.1


# ---------------------------------------------------------------- the original's JSON lists
def explain_py_list(scores: torch.Tensor, dataset: list[dict]) -> str:
    """explain.py's output for one test example (include_mapping), transcribed."""
    structured_data = []
    for i in range(len(scores)):
        structured_data.append({"score": float(scores[i].item()), **dataset[i]})
    structured_data.sort(key=lambda x: x["score"], reverse=True)
    return json.dumps(structured_data, indent=2)


def original_json_dirs(tmp_path, n_train=90, n_test=5, seed=4):
    """Full cosine lists with the zero gradient's NaN, a candidate with noise and cosine 0."""
    rng = np.random.default_rng(seed)
    at = zero_gradient_position(n_train - 1)
    samples = [
        {"dataset": "tulu", "id": f"s{i}", "messages": [{"role": "user", "content": f"q{i}"}]}
        for i in range(n_train)
    ]
    samples[at]["id"] = ZERO_GRADIENT_ID
    full = rng.uniform(-1, 1, (n_test, n_train)).astype(np.float16)
    full[:, at] = np.nan
    projected = full.astype(np.float32) + rng.normal(0, 1e-3, full.shape).astype(np.float32)
    projected[:, at] = 0
    root = tmp_path / "explainability"
    ref = write_original_lists(
        root / "16777216/OLMO/cosine", torch.from_numpy(full), samples, "a/b"
    )
    cand = write_original_lists(
        root / "8192/OLMO/rademacher/cosine", torch.from_numpy(projected), samples, "a/b"
    )
    return samples, full, projected, ref, cand


def test_lists_are_written_exactly_as_explain_py_wrote_them(tmp_path):
    samples, full, _, ref, _ = original_json_dirs(tmp_path)
    assert ref[2].name == "a_b_test_2.json"
    assert ref[2].read_text() == explain_py_list(torch.from_numpy(full[2]), samples)


def test_json_reader_gives_the_notebooks_numbers_and_the_correct_ones(tmp_path):
    samples, full, projected, ref, cand = original_json_dirs(tmp_path)
    per_test, excluded = agreement_per_list(ref[0].parent, [cand[0].parent])
    assert excluded == {str(cand[0].parent): {ZERO_GRADIENT_ID}}
    ids = [s["id"] for s in samples]
    at = ids.index(ZERO_GRADIENT_ID)
    tau = per_test[per_test.metric == "kendall_tau"]
    for i in range(len(full)):
        name = f"a_b_test_{i}.json"
        notebook = notebook_kendall(
            python_sort_positions(full[i].astype(float).tolist(), drop=at),
            python_sort_positions(projected[i].astype(float).tolist(), drop=at),
        )
        keep = np.arange(len(ids)) != at
        correct = scipy.stats.kendalltau(full[i][keep], projected[i][keep]).statistic
        got = tau[tau.test_file == name].set_index("way").value
        assert got["notebook"] == pytest.approx(notebook, abs=1e-12)
        assert got["correct"] == pytest.approx(correct, abs=1e-12)
    assert tau[tau.way == "notebook"].value.median() < 0.9
    assert tau[tau.way == "correct"].value.median() > 0.99


def test_original_json_command_writes_both_ways_and_refuses_a_lone_folder(tmp_path, capsys):
    from gradproj.cli import compare_main as main

    _, _, _, ref, cand = original_json_dirs(tmp_path)
    out = tmp_path / "out"
    assert (
        main(["--original_json", str(ref[0].parent), str(cand[0].parent), "--output", str(out)])
        == 0
    )
    assert ZERO_GRADIENT_ID in capsys.readouterr().err
    summary = (out / "original_json_summary.csv").read_text().splitlines()
    assert summary[0] == "candidate,metric,notebook,correct" and len(summary) == 3
    line = user_error_line(
        main, ["--original_json", str(ref[0].parent), "--output", str(out)], capsys
    )
    assert "needs a reference folder and at least one candidate" in line


def test_json_reader_refuses_lists_without_ids(tmp_path):
    (tmp_path / "x_test_0.json").write_text(json.dumps([{"score": 0.5}]))
    with pytest.raises(UserError, match="--mapped yes"):
        agreement_per_list(tmp_path, [tmp_path])
