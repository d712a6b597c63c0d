"""gradproj score --precondition gram against numpy.linalg.solve, and the factorization file."""

import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from gradproj import curvature, fsio, store
from gradproj.cli import extract_main
from gradproj.cli import score_main as main
from gradproj.extract.factors import write_kfac_factors
from tests.conftest import conversations, snapshot, user_error_line, write_jsonl
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
    assert summary["preconditioner"]["curvature_sha256"] == fsio.file_sha256(stored)
    assert summary["options"]["precondition"] == "gram"


def test_a_factorization_of_an_older_format_is_recomputed_with_a_warning(tmp_path, capsys):
    """Its own cache in an earlier format: recomputed in place (the query's default reads it)."""
    from safetensors import safe_open

    train = golden_run(tmp_path, "params_kronecker_4x8", "train")
    test = golden_run(tmp_path, "params_kronecker_4x8", "test")
    stored = train / "curvature" / "gram.safetensors"
    score(train, test, tmp_path / "first")
    fresh = stored.read_bytes()
    with safe_open(str(stored), framework="pt") as f:
        info = fsio.read_metadata(f) | {"format": "gradproj-curvature/1"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    fsio.write_safetensors(tensors, stored, info)
    capsys.readouterr()
    score(train, test, tmp_path / "again")
    assert "was written by an older gradproj: recomputing it" in capsys.readouterr().err
    assert stored.read_bytes() == fresh


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
    "train shards sha256": ({"scale": 2.0}, {}),  # the same header, other vectors
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
    assert "--damping 0: use a value from 1e-08 to 1e+06" in refused(
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
    manifest = store.Manifest(kind="projected", modules=modules)
    assert curvature.vector_blocks(manifest, 12) == curvature.BlockLayout(("a", "b"), 6)
    dense = store.Manifest(kind="projected", modules=[{"name": "a"}, {"name": "b"}])  # LESS-style
    assert curvature.vector_blocks(dense, 32) == curvature.BlockLayout(("all",), 32)
    hidden = store.Manifest(kind="hidden")
    assert curvature.vector_blocks(hidden, 8) == curvature.BlockLayout(("all",), 8)


def test_whitener_refuses_vectors_of_another_width(tmp_path):
    train = golden_run(tmp_path, "params_kronecker_4x8", "train")
    whiten = curvature.Whitener(curvature.compute_gram(store.Run(train), "cpu"), 1.0, "cpu")
    with pytest.raises(curvature.UserError, match="covers 128"):
        whiten(torch.zeros(1, 64, dtype=torch.float64))


# --- kfac ---


@pytest.fixture(scope="module")
def params_runs(tiny_llama, tmp_path_factory) -> dict:
    """Train and test runs of the tiny model's self-attention layers, kronecker 2x3, in batches
    of several examples (padded: the factors must leave the padding out)."""
    root = tmp_path_factory.mktemp("kfac")
    files = {
        "train": write_jsonl(root / "train_set.jsonl", conversations(10, long_every=4)),
        "test": write_jsonl(root / "test_set.jsonl", conversations(14)[10:]),
    }
    runs = {}
    for role, dataset in files.items():
        argv = [str(tiny_llama), str(dataset), "0", "--gradients_output_path", str(root / "g"),
                "--max_seq_length", "40", "--batch_tokens", "96", "--target", "params",
                "--modules", "*.self_attn.*", "--random_projection", "--proj_type",
                "kronecker", "--proj_dim", "2x3"]  # fmt: skip
        assert extract_main(argv) == 0
        runs[role] = root / "g" / "params_kronecker_2x3" / tiny_llama.name / dataset.stem
        runs[role] = runs[role] / "train" / "0"
    return runs


def kfac_factors(path) -> tuple[np.ndarray, np.ndarray]:
    """Each module's S_out and S_in, rebuilt from the stored eigendecompositions."""
    t = curvature.load(path).tensors

    def rebuild(side):
        q, s = t[f"{side}_eigenvectors"].numpy(), t[f"{side}_eigenvalues"].numpy()
        return np.einsum("bij,bj,bkj->bik", q, s, q)

    return rebuild("out"), rebuild("in")


def test_kfac_matches_solve_with_the_kronecker_product_of_the_factors(params_runs, tmp_path):
    train, test = params_runs["train"], params_runs["test"]
    factor_file = tmp_path / "kfac.safetensors"
    ours = score(train, test, tmp_path / "s", "--precondition", "kfac", "--curvature",
                 str(factor_file), "--damping", "0.1")  # fmt: skip
    s_out, s_in = kfac_factors(factor_file)
    assert len(s_out) == len(store.Run(train).manifest.modules) > 1
    blocks = []
    for a, b in zip(s_out, s_in, strict=True):
        product = np.kron(a, b)  # row-major vec of a k_out x k_in block
        lam = 0.1 * np.trace(product) / len(product)
        blocks.append(product + lam * np.eye(len(product)))
    m = np.zeros((6 * len(blocks), 6 * len(blocks)))
    for i, block in enumerate(blocks):
        m[6 * i : 6 * (i + 1), 6 * i : 6 * (i + 1)] = block
    assert_close(ours, solve_with(m, vectors_of(train), vectors_of(test)))


def solve_with(m, phi, t):
    dot = t @ np.linalg.solve(m, phi.T)
    test_norms = np.sqrt(np.einsum("ij,ji->i", t, np.linalg.solve(m, t.T)))
    train_norms = np.sqrt(np.einsum("ij,ji->i", phi, np.linalg.solve(m, phi.T)))
    return {"dot": dot, "cosine": dot / np.outer(test_norms, train_norms)}


def test_kfac_factors_are_the_token_covariances_one_example_at_a_time(params_runs, tmp_path):
    """The factors against hooks on each example alone (no batch, no padding), in fp64."""
    from gradproj import data, gradients, models
    from gradproj.targets.params import Layer, layer_projection

    run = store.Run(params_runs["train"])
    factor_file = tmp_path / "kfac.safetensors"
    write_kfac_factors(run, factor_file, "cpu")
    s_out, s_in = kfac_factors(factor_file)
    options = run.manifest.options
    checkpoint = models.resolve_checkpoint(options["model"], 0)
    tokenizer = models.load_tokenizer(checkpoint)
    model = models.load_model(checkpoint, "sft", torch.float32, "cpu")
    rows, _ = data.load_rows(options["dataset"], "train")
    name = run.manifest.modules[-1]["name"]
    module = dict(model.named_modules())[name]
    projection = layer_projection(42, Layer(name, *module.weight.shape, 0), ["2x3"], "cpu")
    left, right = (f.double() for f in projection.widest_factors())
    out_sum, in_sum, tokens = np.zeros((2, 2)), np.zeros((3, 3)), 0
    seen = {}
    taps = gradients.LinearTaps(
        [(name, module)], lambda n, x: seen.update(x=x), lambda n, d: seen.update(d=d)
    )
    for entry in run.manifest.examples:
        ex = data.tokenize(tokenizer, rows[entry["index"]], entry["index"], "sft", 40)
        with taps:
            gradients.embedding_gradients(model, [ex], True)
        u = (seen["d"][0].double() @ left).numpy()
        v = (seen["x"][0].double() @ right).numpy()
        out_sum += u.T @ u
        in_sum += v.T @ v
        tokens += ex.length
    for ours, reference in ((s_out[-1], out_sum / tokens), (s_in[-1], in_sum / tokens)):
        assert np.abs(ours - reference).max() < 1e-5 * np.abs(reference).max()


def test_scoring_alone_reads_no_model_for_kfac(params_runs, tmp_path):
    """The scoring stage reads a stored kfac file; without one it says how to make it (the
    front ends run the factor pass, which reads the model, before scoring)."""
    run, path = store.Run(params_runs["train"]), tmp_path / "kfac.safetensors"
    with pytest.raises(curvature.UserError) as refused:
        curvature.load_or_compute("kfac", run, path, "cpu")
    assert str(refused.value) == (
        f"--curvature {path}: no current kfac factors of {run.path}; they come from the model: "
        "run gradproj score --precondition kfac on the run, which computes them"
    )
    assert not path.exists()
    write_kfac_factors(run, path, "cpu")
    assert curvature.load_or_compute("kfac", run, path, "cpu").kind == "kfac"


def test_kfac_is_refused_for_other_runs(tmp_path, capsys):
    train = golden_run(tmp_path, "params_rademacher_32", "train")
    argv = ["--train", str(train), "--test", str(train), "--output", str(tmp_path / "s"),
            "--precondition", "kfac"]  # fmt: skip
    line = user_error_line(main, argv, capsys)
    assert "kfac needs a params run projected by kronecker" in line


# --- Issue 30: hostile output paths, damaged files, damping, edited data, merged runs ---


def refused_line(argv, capsys, *roots) -> str:
    """The one error line of a scoring refused with exit 2 and no traceback, having changed
    nothing below `roots` (its inputs; a refusal after the output's lock was taken leaves the
    lock file beside the output)."""
    before = snapshot(*roots)
    line = user_error_line(main, argv, capsys)
    assert snapshot(*roots) == before
    return line


@pytest.mark.parametrize("option", ["--curvature", "--output"])
def test_a_fifo_as_an_output_path_is_refused_and_kept(tmp_path, capsys, option):
    train = golden_run(tmp_path, "rademacher_64", "train")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    paths = {"--curvature": tmp_path / "s", "--output": fifo}
    argv = ["--train", str(train), "--test", str(train), "--precondition", "gram",
            "--output", str(paths["--output"])]  # fmt: skip
    if option == "--curvature":
        argv += ["--curvature", str(fifo)]
    line = refused_line(argv, capsys, tmp_path)
    assert line.startswith(f"error: {option} {fifo} is a named pipe (FIFO), where gradproj ")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def damage(path, name: str, change) -> None:
    """Replace tensor `name` of a curvature file by `change(it)`, keeping the metadata (and so
    the checksum it records)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors[name] = change(tensors[name])
    save_file(tensors, str(path), metadata=metadata)


DAMAGE = {  # what is damaged, and how
    "eigenvector bits flipped": (
        "eigenvectors",
        lambda v: (v.view(torch.int64) ^ (1 << 62)).view(torch.float64),
    ),
    "negative eigenvalues": ("eigenvalues", lambda v: -v),
    "NaN eigenvalue": ("eigenvalues", lambda v: v.where(v != v.max(), float("nan"))),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_curvature_file_is_refused(tmp_path, capsys, kind):
    train = golden_run(tmp_path, "params_kronecker_4x8", "train")
    stored = train / "curvature" / "gram.safetensors"
    score(train, train, tmp_path / "first")
    damage(stored, *DAMAGE[kind])
    argv = ["--train", str(train), "--test", str(train), "--output", str(tmp_path / "out" / "s"),
            "--precondition", "gram"]  # fmt: skip
    line = refused_line(argv, capsys, train)
    assert line == (
        f"error: --curvature {stored} is damaged: its tensors do not match the checksum it "
        "records; delete it, and the next scoring recomputes it"
    )
    stored.unlink()
    assert main(argv) == 0  # recomputed


@pytest.mark.parametrize("damping", ["1e300", "1e-300", "inf", "nan", "-1", "1e-9", "2e6"])
def test_a_damping_outside_its_range_is_refused_naming_the_option(tmp_path, capsys, damping):
    train = golden_run(tmp_path, "rademacher_64", "train")
    argv = ["--train", str(train), "--test", str(train), "--output", str(tmp_path / "s"),
            "--precondition", "gram", "--damping", damping]  # fmt: skip
    line = refused_line(argv, capsys, tmp_path)
    assert line.startswith(f"error: --damping {float(damping):g}: use a value from 1e-08 to 1e+06")


@pytest.mark.parametrize("damping", ["1e-8", "1e6"])
def test_the_ends_of_the_damping_range_give_finite_scores_that_rank(tmp_path, damping):
    train = golden_run(tmp_path, "rademacher_64", "train")
    test = golden_run(tmp_path, "rademacher_64", "test")
    scores = score(train, test, tmp_path / "s", "--damping", damping)
    for matrix in scores.values():
        assert torch.isfinite(matrix).all() and (matrix != 0).all()
        assert len(set(matrix.flatten().tolist())) == matrix.numel()  # no ties: a ranking


def test_kfac_refuses_a_train_dataset_edited_since_the_extraction(params_runs, tmp_path, capsys):
    train = shutil.copytree(params_runs["train"], tmp_path / "train")
    manifest = json.loads((train / "manifest.json").read_text())
    rows = [json.loads(x) for x in Path(manifest["options"]["dataset"]).read_text().splitlines()]
    rows[1]["messages"][1]["content"] += " And a few more words."  # same id, other text
    manifest["options"]["dataset"] = str(write_jsonl(tmp_path / "edited.jsonl", rows))
    (train / "manifest.json").write_text(json.dumps(manifest))
    argv = ["--train", str(train), "--test", str(params_runs["test"]), "--output",
            str(tmp_path / "out" / "s"), "--precondition", "kfac"]  # fmt: skip
    inputs = [*train.glob("*.*"), tmp_path / "edited.jsonl", params_runs["test"]]
    line = refused_line(argv, capsys, *inputs)
    assert not list(train.glob("curvature/*"))  # nothing computed, nothing stored
    assert re.fullmatch(
        rf"error: row 1 of {re.escape(str(tmp_path))}/edited.jsonl is 'ex_001' of \d+ tokens "
        r"\(\d+ in the loss\), but the run's extraction read 'ex_001' of \d+ tokens \(\d+ in the "
        r"loss\) there: the dataset changed since, and kfac reads it again; restore the "
        "extraction's dataset or re-extract the run",
        line,
    )


def test_kfac_after_merge_equals_kfac_before_it(params_runs, tmp_path, capsys):
    """A manifest rebuilt by merge keeps the run's own kfac file valid (the same scores); one
    rebuilt from the shards lacks the options that recomputing it needs, and kfac says so."""
    from gradproj.store import merge_run

    train = shutil.copytree(params_runs["train"], tmp_path / "train")
    argv = ["--train", str(train), "--test", str(params_runs["test"]), "--precondition", "kfac"]

    def scored(name: str) -> bytes:
        assert main([*argv, "--output", str(tmp_path / name)]) == 0
        return (tmp_path / name / "scores.safetensors").read_bytes()

    before = scored("before")
    assert merge_run(str(train)) == 0
    assert scored("merged") == before
    (train / "manifest.json").unlink()
    assert merge_run(str(train)) == 0
    assert "options" not in json.loads((train / "manifest.json").read_text())
    assert scored("rebuilt") == before
    (train / "curvature" / "kfac.safetensors").unlink()
    line = refused_line([*argv, "--output", str(tmp_path / "out" / "s")], capsys, train)
    assert "--precondition kfac reads the model again with the extraction's options" in line
