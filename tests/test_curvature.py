"""gradproj score --precondition gram against numpy.linalg.solve, and the factorization file."""

import json
import shutil

import numpy as np
import pytest
import torch

from gradproj import curvature, store
from gradproj.cli import score_main as main
from tests.conftest import user_error_line
from tests.test_golden import EXPECTED
from tests.test_influence import read_scores, synthetic_run

# A real params kronecker run (4 modules of 4x8) and one of the embedding target, from the golden
# files: the block layout is the one the extraction writes.
GOLDEN_RUNS = EXPECTED / "gradients"
TOLERANCE = 1e-10  # fp64 scores against fp64 numpy


def golden_run(tmp_path, variant: str, split: str):
    """A copy (the factorization is written beside the run) of a golden run."""
    source = GOLDEN_RUNS / variant / "model" / split / split / "0"
    return shutil.copytree(source, tmp_path / variant / split)


def kronecker_module_params(k_out, k_in, names):
    modules = [
        {"name": n, "d_out": 9, "d_in": 7, "slice": [i * k_out * k_in, (i + 1) * k_out * k_in]}
        for i, n in enumerate(names)
    ]
    projection = {"type": "kronecker", "seed": 42, "dim": f"{k_out}x{k_in}"}
    return {"target": "params", "modules": modules, "projection": projection}


def vectors_of(path) -> np.ndarray:
    run = store.Run(path)
    return np.stack([run.dense_vector(i).double().numpy() for i in range(len(run.ids))])


def solve_reference(train, test, blocks, damping):
    """fp64 dot `t^T (G + lambda I)^-1 a` and its whitened cosine, by numpy.linalg.solve on
    the block-diagonal matrix assembled in full."""
    phi = vectors_of(train)
    t = vectors_of(test)
    m = np.zeros((phi.shape[1], phi.shape[1]))
    for start, end in blocks:
        part = phi[:, start:end]
        gram = part.T @ part / len(phi)
        lam = damping * np.trace(gram) / (end - start)
        m[start:end, start:end] = gram + lam * np.eye(end - start)
    dot = t @ np.linalg.solve(m, phi.T)
    test_norms = np.sqrt(np.einsum("ij,ji->i", t, np.linalg.solve(m, t.T)))
    train_norms = np.sqrt(np.einsum("ij,ji->i", phi, np.linalg.solve(m, phi.T)))
    return {"dot": dot, "cosine": dot / np.outer(test_norms, train_norms)}


def score(train, test, out, *extra):
    argv = ["--train", str(train), "--test", str(test), "--output", str(out), "--precision",
            "fp64", "--precondition", "gram", *extra]  # fmt: skip
    assert main(argv) == 0
    return read_scores(out)[0]


def assert_close(ours: dict, reference: dict):
    for name, ref in reference.items():
        error = np.abs(ours[name].numpy() - ref).max() / np.abs(ref).max()
        assert error < TOLERANCE, (name, error)


# --- Arithmetic ---


@pytest.mark.parametrize("damping", ["1.0", "0.01"])
def test_block_diagonal_gram_of_a_params_run_matches_solve(tmp_path, damping):
    train = golden_run(tmp_path, "params_kronecker_4x8", "train")
    test = golden_run(tmp_path, "params_kronecker_4x8", "test")
    ours = score(train, test, tmp_path / "s", "--damping", damping)
    blocks = [(i * 32, (i + 1) * 32) for i in range(4)]  # 4 modules of 4 x 8, in module order
    assert_close(ours, solve_reference(train, test, blocks, float(damping)))
    assert curvature.load(train / "curvature" / "gram.safetensors").blocks.count == 4


@pytest.mark.parametrize("variant", ["rademacher_64", "params_rademacher_32", "hidden"])
def test_whole_vector_gram_matches_solve(tmp_path, variant):
    train, test = golden_run(tmp_path, variant, "train"), golden_run(tmp_path, variant, "test")
    ours = score(train, test, tmp_path / "s")
    width = vectors_of(train).shape[1]
    assert_close(ours, solve_reference(train, test, [(0, width)], curvature.DEFAULT_DAMPING))


@pytest.mark.parametrize("per_module", [True, False])
def test_synthetic_runs_with_more_examples_than_coordinates(tmp_path, per_module):
    """The k x k Gram route (more examples than coordinates), blocks of unequal scale."""
    rng = torch.Generator().manual_seed(0)
    header = kronecker_module_params(2, 3, ["a", "b", "c"]) if per_module else {}
    scale = torch.tensor([1.0] * 6 + [30.0] * 6 + [0.1] * 6)
    train = synthetic_run(tmp_path / "train", list(torch.randn(40, 18, generator=rng) * scale),
                          per_file=7, **header)  # fmt: skip
    test = synthetic_run(tmp_path / "test", list(torch.randn(5, 18, generator=rng)), **header)
    ours = score(train, test, tmp_path / "s", "--damping", "0.1")
    blocks = [(0, 6), (6, 12), (12, 18)] if per_module else [(0, 18)]
    assert_close(ours, solve_reference(train, test, blocks, 0.1))


def test_whitener_of_one_vector_is_its_row_of_the_batch(tmp_path):
    train = golden_run(tmp_path, "params_kronecker_4x8", "train")
    factorization = curvature.compute_gram(store.Run(train), "cpu")
    whiten = curvature.Whitener(factorization, 1.0, "cpu")
    vectors = torch.from_numpy(vectors_of(train))
    batch = whiten(vectors)
    one = whiten(vectors[3:4])
    assert torch.allclose(one[0], batch[3], rtol=1e-12, atol=0)


# --- The stored factorization ---


def test_reused_factorization_gives_the_bytes_of_a_recomputed_one(tmp_path):
    train = golden_run(tmp_path, "params_kronecker_4x8", "train")
    test = golden_run(tmp_path, "params_kronecker_4x8", "test")
    stored = train / "curvature" / "gram.safetensors"
    score(train, test, tmp_path / "first")
    first_file = stored.read_bytes()
    score(train, test, tmp_path / "reused")
    assert stored.read_bytes() == first_file
    stored.unlink()
    score(train, test, tmp_path / "recomputed", "--memory_gb", "7e-5")  # other blocks
    assert stored.read_bytes() == first_file
    blocks = json.loads((tmp_path / "recomputed" / "summary.json").read_text())["blocks"]
    assert blocks["train"] > 1 and blocks["test"] > 1
    for name in ("reused", "recomputed"):
        a = (tmp_path / "first" / "scores.safetensors").read_bytes()
        assert (tmp_path / name / "scores.safetensors").read_bytes() == a, name
    summary = json.loads((tmp_path / "first" / "summary.json").read_text())
    assert summary["preconditioner"]["curvature_sha256"] == store.file_sha256(stored)
    assert summary["options"]["precondition"] == "gram"


def test_plain_scoring_records_no_preconditioning_options(tmp_path):
    train = golden_run(tmp_path, "rademacher_64", "train")
    test = golden_run(tmp_path, "rademacher_64", "test")
    assert main(["--train", str(train), "--test", str(test), "--output", str(tmp_path / "s")]) == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert "preconditioner" not in summary and "precondition" not in summary["options"]
    assert not (train / "curvature").exists()


def test_default_output_names_the_preconditioner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = golden_run(tmp_path, "rademacher_64", "train")
    test = golden_run(tmp_path, "rademacher_64", "test")
    argv = ["--train", str(train), "--test", str(test), "--precondition", "gram"]
    assert main(argv) == 0
    assert (tmp_path / "explainability" / "64_gram").is_dir()


# --- Refusals ---

OTHER_RUNS = {
    "projection dim": ({"k": 4}, {"projection": {"type": "rademacher", "seed": 42, "dim": 4}}),
    "projection seed": ({}, {"projection": {"type": "rademacher", "seed": 7, "dim": 8}}),
    "modules": ({}, {"modules": [{"name": "other"}]}),
    "train manifest sha256": ({"scale": 2.0}, {}),  # the same header, other vectors
}


@pytest.mark.parametrize("field", OTHER_RUNS)
def test_a_factorization_of_another_run_is_refused(field, tmp_path, capsys):
    size, header = OTHER_RUNS[field]
    k = size.get("k", 8)
    mine = synthetic_run(tmp_path / "mine", list(torch.ones(5, 8) + torch.eye(5, 8)))
    other_vectors = (torch.ones(5, k) + torch.eye(5, k)) * size.get("scale", 1.0)
    other = synthetic_run(tmp_path / "other", list(other_vectors), **header)
    path = tmp_path / "other.safetensors"
    curvature.save(curvature.compute_gram(store.Run(other), "cpu"), path)
    argv = ["--train", str(mine), "--test", str(mine), "--output", str(tmp_path / "s"),
            "--precondition", "gram", "--curvature", str(path)]  # fmt: skip
    line = user_error_line(main, argv, capsys)
    assert "computed from another train run" in line and f"in {field} (" in line
    assert not (tmp_path / "s").exists()


def test_unsupported_inputs_are_refused_before_computing(tmp_path, capsys, monkeypatch):
    ragged = synthetic_run(tmp_path / "full", [torch.ones(3, 4), torch.ones(2, 4)])
    plain = synthetic_run(tmp_path / "plain", list(torch.ones(4, 8)))
    (tmp_path / "notafile.safetensors").write_text("garbage")

    def refused(train, *extra) -> str:
        argv = ["--train", str(train), "--test", str(train), "--output", str(tmp_path / "s"),
                *extra]  # fmt: skip
        return user_error_line(main, argv, capsys)

    assert "needs projected vectors" in refused(ragged, "--precondition", "gram")
    assert "--damping must be positive" in refused(
        plain, "--precondition", "gram", "--damping", "0"
    )
    assert "only used with --precondition" in refused(plain, "--curvature", "x")
    bad_file = refused(
        plain, "--precondition", "gram", "--curvature", str(tmp_path / "notafile.safetensors")
    )
    assert "is not a curvature file" in bad_file
    tiny_budget = refused(plain, "--precondition", "gram", "--memory_gb", "1e-9")
    assert "the preconditioner's matrices need" in tiny_budget
    monkeypatch.setattr(curvature, "MAX_RANK", 2)
    line = refused(plain, "--precondition", "gram")
    assert "have rank up to 4" in line and "GiB" in line
    assert not (tmp_path / "s").exists() and not (plain / "curvature").exists()


def test_blocks_follow_the_module_slices_or_cover_the_whole_vector():
    modules = kronecker_module_params(2, 3, ["a", "b"])["modules"]
    manifest = {"kind": "projected", "modules": modules}
    assert curvature.vector_blocks(manifest, 12) == curvature.Blocks(("a", "b"), 6)
    dense = {"kind": "projected", "modules": [{"name": "a"}, {"name": "b"}]}  # LESS-style
    assert curvature.vector_blocks(dense, 32) == curvature.Blocks(("all",), 32)
    assert curvature.vector_blocks({"kind": "hidden"}, 8) == curvature.Blocks(("all",), 8)


def test_whitener_refuses_vectors_of_another_width(tmp_path):
    train = golden_run(tmp_path, "params_kronecker_4x8", "train")
    whiten = curvature.Whitener(curvature.compute_gram(store.Run(train), "cpu"), 1.0, "cpu")
    with pytest.raises(curvature.UserError, match="covers 128"):
        whiten(torch.zeros(1, 64, dtype=torch.float64))
