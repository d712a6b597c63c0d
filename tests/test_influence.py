"""score_influence.py against brute-force fp64 references, on real tiny runs and synthetic ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gradproj import fsio, influence, store
from gradproj.cli import extract_main
from gradproj.cli import score_main as main
from tests.conftest import REPO, conversations, user_error_line, write_jsonl

MAX_LEN = 40
TOLERANCE = 1e-6  # max abs error relative to the score scale (max |reference score|)


# --- Runs: real ones from the tiny model, synthetic ones with controlled vectors ---


@pytest.fixture(scope="module")
def real_runs(tiny_llama, tmp_path_factory) -> dict:
    """Train and test runs (full and rademacher_16) of the tiny model, 4 examples per shard."""
    root = tmp_path_factory.mktemp("influence")
    test_rows = [r | {"id": f"q_{i}"} for i, r in enumerate(conversations(9, long_every=4))]
    files = {
        "train": write_jsonl(root / "train_set.jsonl", conversations(13, long_every=5)),
        "test": write_jsonl(root / "test_set.jsonl", test_rows[3:]),
    }
    runs = {}
    for role, dataset in files.items():
        argv = [str(tiny_llama), str(dataset), "0", "--gradients_output_path", str(root / "g"),
                "--max_seq_length", str(MAX_LEN), "--gradients_per_file", "4",
                "--random_projection", "--proj_dim", "full,16"]  # fmt: skip
        assert extract_main(argv) == 0
        for variant in ("full", "rademacher_16"):
            path = root / "g" / variant / tiny_llama.name / dataset.stem / "train" / "0"
            runs[role, variant] = path
    runs["train_file"] = files["train"]
    return runs


def synthetic_run(path: Path, grads: list, per_file=3, skipped=(), width=8, **header) -> Path:
    """A run written with the store directly: `grads` are [k] vectors or [length, h] rows."""
    ragged = bool(grads) and grads[0].dim() == 2
    width = grads[0].shape[-1] if grads else width
    base = {
        "kind": "full" if ragged else "projected",
        "target": "embeddings",
        "model": "m",
        "checkpoint": "main",
        "dataset": "d",
        "split": "train",
        "projection": None if ragged else {"type": "rademacher", "seed": 42, "dim": width},
        "hidden_size": width if ragged else 8,
        "max_seq_length": 16,
        "shard_size": per_file,
    }
    header = base | header
    skipped = {s["index"]: s for s in skipped}
    n = len(grads) + len(skipped)
    fresh, it = {}, iter(grads)
    for start, end in store.shard_ranges(0, n, per_file):
        record, mine = store.ShardRecord(), []
        for i in range(start, end):
            if i in skipped:
                record.skipped.append(skipped[i])
                continue
            g = next(it)
            mine.append(g)
            tokens = g.shape[0] if ragged else 1
            record.examples.append({"index": i, "id": f"s{i}", "tokens": tokens, "grad_norm": 1.0})
        index = torch.tensor([e["index"] for e in record.examples], dtype=torch.long)
        if ragged:
            lengths = torch.tensor([0] + [g.shape[0] for g in mine])
            tensors = {"values": torch.cat(mine) if mine else torch.zeros(0, width),
                       "offsets": torch.cumsum(lengths, 0), "index": index}  # fmt: skip
        else:
            vectors = torch.stack(mine) if mine else torch.zeros(0, width)
            tensors = {"vectors": vectors, "index": index}
        entry = store.write_shard(path, start, end, tensors, record)
        fresh[entry["file"]] = entry
    store.merge_manifest(path, header, n, per_file, fresh)
    return path


# --- Helpers ---


def score(train, test, out, *extra) -> Path:
    assert main(["--train", str(train), "--test", str(test), "--output", str(out), *extra]) == 0
    return out


def read_scores(out: Path) -> tuple[dict, dict]:
    with safe_open(str(out / "scores.safetensors"), framework="pt") as f:
        info = json.loads(f.metadata()["gradproj"])
        return {name: f.get_tensor(name) for name in f.keys()}, info  # noqa: SIM118


def dense_matrix(path: Path) -> tuple[list[str], torch.Tensor]:
    """Every example of a run as a dense fp64 vector (store's own reader, not the scorer's)."""
    run = store.Run(path)
    return run.ids, torch.stack([run.dense_vector(i).double() for i in range(len(run.ids))])


def brute_force(train: Path, test: Path) -> dict[str, torch.Tensor]:
    """fp64 dot and cosine by elementwise products and sums: no BLAS, no blocking."""
    _, a = dense_matrix(train)
    _, t = dense_matrix(test)
    dot = (t[:, None, :] * a[None, :, :]).sum(-1)
    norms_t, norms_a = t.square().sum(-1).sqrt(), a.square().sum(-1).sqrt()
    return {"dot": dot, "cosine": dot / (norms_t[:, None] * norms_a[None, :])}


def max_relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference).abs().max() / reference.abs().max()).item()


def bad(argv, capsys) -> str:
    return user_error_line(main, argv, capsys)


# --- Arithmetic against the fp64 reference ---


@pytest.mark.parametrize("variant", ["rademacher_16", "full"])
def test_scores_match_fp64_brute_force(real_runs, variant, tmp_path):
    train, test = real_runs["train", variant], real_runs["test", variant]
    tensors, info = read_scores(score(train, test, tmp_path / "s", "--func", "both"))
    assert info["train_ids"] == store.Run(train).ids and info["test_ids"] == store.Run(test).ids
    reference = brute_force(train, test)
    for name in ("dot", "cosine"):
        assert tensors[name].dtype == torch.float32
        assert max_relative_error(tensors[name], reference[name]) < TOLERANCE, name


# 1 or 2 positions per chunk
@pytest.mark.parametrize("chunk_coords", [influence.kernel.CHUNK_COORDS, 10])
def test_ragged_bf16_scores_of_unequal_lengths_match_in_fp64(chunk_coords, tmp_path, monkeypatch):
    monkeypatch.setattr(influence.kernel, "CHUNK_COORDS", chunk_coords)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(int(n), 5, generator=gen).bfloat16() for n in torch.randint(1, 12, (11,))]
    train = synthetic_run(tmp_path / "train", rows[:7])
    test = synthetic_run(tmp_path / "test", rows[7:], per_file=2)
    tensors, _ = read_scores(score(train, test, tmp_path / "s", "--precision", "fp64"))
    reference = brute_force(train, test)
    for name in ("dot", "cosine"):
        assert tensors[name].dtype == torch.float64
        assert max_relative_error(tensors[name], reference[name]) < 1e-12, name


@pytest.mark.parametrize("variant", ["rademacher_16", "full"])
def test_tiny_memory_budget_gives_the_scores_of_one_block(real_runs, variant, tmp_path):
    train, test = real_runs["train", variant], real_runs["test", variant]
    whole, _ = read_scores(score(train, test, tmp_path / "one", "--memory_gb", "4"))
    streamed, _ = read_scores(score(train, test, tmp_path / "many", "--memory_gb", "2e-6"))
    blocks = json.loads((tmp_path / "many" / "summary.json").read_text())["blocks"]
    assert blocks["train"] >= len(store.Run(train).ids) // 2 and blocks["test"] > 1
    for name in ("dot", "cosine"):
        assert torch.equal(whole[name], streamed[name]), name


def test_unchanged_inputs_keep_the_scores_and_a_changed_input_or_option_rescores(tmp_path, capsys):
    gen = torch.Generator().manual_seed(5)
    train = synthetic_run(tmp_path / "train", list(torch.randn(5, 8, generator=gen)))
    test = synthetic_run(tmp_path / "test", list(torch.randn(2, 8, generator=gen)))
    out = score(train, test, tmp_path / "s", "--top_k", "3")
    scores_file = out / "scores.safetensors"

    def rescored(*extra) -> bool:
        before = scores_file.stat().st_ino
        capsys.readouterr()
        score(train, test, out, *extra)
        kept = "up to date" in capsys.readouterr().err
        assert kept == (scores_file.stat().st_ino == before)  # kept means not rewritten
        return not kept

    assert not rescored("--top_k", "3")
    assert not rescored("--top_k", "3", "--memory_gb", "1e-6")  # block sizes: same scores
    assert rescored("--top_k", "4")
    assert rescored("--top_k", "4", "--func", "dot")
    synthetic_run(tmp_path / "test", list(torch.randn(2, 8, generator=gen)))  # new gradients
    assert rescored("--top_k", "4", "--func", "dot")
    assert not rescored("--top_k", "4", "--func", "dot")


# --- Outputs ---


def test_topk_lists_the_highest_and_lowest_in_a_total_order(tmp_path):
    gen = torch.Generator().manual_seed(2)
    distinct = torch.randn(4, 8, generator=gen)
    train = synthetic_run(tmp_path / "train", [distinct[i % 4] for i in range(12)])  # 3-way ties
    test = synthetic_run(tmp_path / "test", list(torch.randn(3, 8, generator=gen)))
    out = score(train, test, tmp_path / "s", "--top_k", "4")
    tensors, info = read_scores(out)
    lines = [json.loads(x) for x in (out / "topk.jsonl").read_text().splitlines()]
    assert [x["test_id"] for x in lines] == info["test_ids"]
    ids = np.array(info["train_ids"])
    for j, line in enumerate(lines):
        for name in ("dot", "cosine"):
            row = tensors[name][j].numpy()
            top, bottom = np.argsort(-row, kind="stable")[:4], np.argsort(row, kind="stable")[:4]
            assert line[name]["top_ids"] == ids[top].tolist()
            assert line[name]["top_scores"] == row[top].tolist()
            assert line[name]["bottom_ids"] == ids[bottom].tolist()
            assert line[name]["bottom_scores"] == row[bottom].tolist()


def test_summary_statistics_and_provenance(real_runs, tmp_path):
    train, test = real_runs["train", "full"], real_runs["test", "full"]
    out = score(train, test, tmp_path / "s", "--func", "dot")
    summary = json.loads((out / "summary.json").read_text())
    reference = brute_force(train, test)["dot"].numpy()
    np.testing.assert_allclose(summary["per_test"]["dot"]["mean"], reference.mean(1), rtol=1e-6)
    np.testing.assert_allclose(summary["per_test"]["dot"]["std"], reference.std(1), rtol=1e-6)
    for role, path in (("train", train), ("test", test)):
        described = summary[f"{role}_manifest"]
        manifest = json.loads((path / "manifest.json").read_text())
        assert all(described[k] == manifest[k] for k in ("model", "kind", "projection", "split"))
        assert described["manifest_sha256"] == fsio.file_sha256(path / "manifest.json")


def test_mapped_files_are_sorted_and_carry_the_sample_fields(real_runs, tmp_path):
    train, test = real_runs["train", "rademacher_16"], real_runs["test", "rademacher_16"]
    out = score(train, test, tmp_path / "s", "--func", "cosine", "--mapped")
    tensors, info = read_scores(out)
    rows = {r["id"]: r for r in map(json.loads, real_runs["train_file"].read_text().splitlines())}
    test_index = [e["index"] for e in store.Run(test).manifest.examples]
    assert sorted(p.name for p in (out / "mapped").iterdir()) == sorted(
        f"{i}.json" for i in test_index
    )
    for j, i in enumerate(test_index):
        entries = json.loads((out / "mapped" / f"{i}.json").read_text())
        scores = [e["score"] for e in entries]
        assert scores == sorted(scores, reverse=True)
        by_id = {e["id"]: e for e in entries}
        assert sorted(by_id) == sorted(info["train_ids"])
        for k, train_id in enumerate(info["train_ids"]):
            assert by_id[train_id] == {"score": tensors["cosine"][j, k].item(), **rows[train_id]}


# --- Exclusions and refusals ---


def test_zero_gradients_are_excluded_and_reported(tmp_path, capsys):
    gen = torch.Generator().manual_seed(1)
    vectors = list(torch.randn(6, 8, generator=gen))
    vectors[2] = torch.zeros(8)
    skipped = [{"index": 4, "id": "s4", "reason": "zero gradient"}]
    train = synthetic_run(tmp_path / "train", vectors, skipped=skipped)
    test_vectors = list(torch.randn(3, 8, generator=gen)) + [torch.zeros(8)]
    test = synthetic_run(tmp_path / "test", test_vectors)
    out = score(train, test, tmp_path / "s")
    tensors, info = read_scores(out)
    excluded = json.loads((out / "summary.json").read_text())["excluded"]
    assert {e["id"] for e in excluded["train"]} == {"s2", "s4"}
    assert {e["id"] for e in excluded["test"]} == {"s3"}
    assert "s2" not in info["train_ids"] and "s3" not in info["test_ids"]
    warning = capsys.readouterr().err
    # s4 was skipped (and warned about) by the extraction: scoring does not repeat it
    assert "s2 (all-zero stored gradient)" in warning and "s4" not in warning
    kept = torch.stack([v for i, v in enumerate(vectors) if i != 2]).double()
    t = torch.stack(test_vectors[:3]).double()
    cosine = (t @ kept.T) / (t.norm(dim=1)[:, None] * kept.norm(dim=1)[None, :])
    assert max_relative_error(tensors["cosine"], cosine) < TOLERANCE


MISMATCHES = {
    "model": ({}, {"model": "other"}),
    "checkpoint": ({}, {"checkpoint": "step_100"}),
    "target": ({}, {"target": "params"}),
    "projection type": ({}, {"projection": {"type": "normal", "seed": 42, "dim": 8}}),
    "projection seed": ({}, {"projection": {"type": "rademacher", "seed": 7, "dim": 8}}),
    "projection dim": ({"k": 4}, {"projection": {"type": "rademacher", "seed": 42, "dim": 4}}),
}


@pytest.mark.parametrize("field", MISMATCHES)
def test_mismatched_runs_are_refused(field, tmp_path, capsys):
    size, header = MISMATCHES[field]
    train = synthetic_run(tmp_path / "train", list(torch.ones(3, 8)))
    test = synthetic_run(tmp_path / "test", list(torch.ones(2, size.get("k", 8))), **header)
    line = bad(["--train", str(train), "--test", str(test), "--output", str(tmp_path)], capsys)
    assert f"differ in {field} (" in line


def test_bad_inputs_are_refused_with_their_reason(tmp_path, capsys):
    good = synthetic_run(tmp_path / "good", list(torch.ones(7, 8)))
    missing = synthetic_run(tmp_path / "missing", list(torch.ones(7, 8)))
    (missing / "3_6.safetensors").unlink()
    corrupt = synthetic_run(tmp_path / "corrupt", list(torch.ones(7, 8)))
    content = bytearray((corrupt / "0_3.safetensors").read_bytes())
    content[-3] ^= 0xFF
    (corrupt / "0_3.safetensors").write_bytes(bytes(content))
    all_skipped = [{"index": i, "id": f"s{i}", "reason": "zero gradient"} for i in range(3)]
    empty = synthetic_run(tmp_path / "empty", [], skipped=all_skipped)
    (tmp_path / "plain").mkdir()
    cases = {
        "not a gradient run": tmp_path / "plain",
        "1 missing (3_6.safetensors)": missing,
        "1 corrupt (0_3.safetensors: its checksum differs": corrupt,
        "holds no gradients": empty,
    }
    for needle, path in cases.items():
        line = bad(["--train", str(path), "--test", str(good), "--output", str(tmp_path)], capsys)
        assert line.startswith("error: --train") and needle in line, needle


def test_non_finite_gradient_is_refused_naming_it(tmp_path, capsys):
    vectors = list(torch.ones(4, 8))
    vectors[1] = torch.full((8,), float("nan"))
    train = synthetic_run(tmp_path / "train", vectors)
    test = synthetic_run(tmp_path / "test", list(torch.ones(2, 8)))
    argv = [
        "--train",
        str(train),
        "--test",
        str(test),
        "--output",
        str(tmp_path / "scores"),
        "--func",
        "cosine",
    ]
    assert "train example 's1'" in bad(argv, capsys)


# --- Front ends ---


def test_default_output_path(real_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train, test = real_runs["train", "rademacher_16"], real_runs["test", "rademacher_16"]
    assert main(["--train", str(train), "--test", str(test), "--func", "dot"]) == 0
    out = tmp_path / "explainability" / "16" / "train_set__test_set" / "dot"
    assert sorted(p.name for p in out.iterdir()) == [
        "scores.safetensors",
        "summary.json",
        "topk.jsonl",
    ]


def test_sbatch_takes_the_original_positional_arguments(real_runs, tmp_path):
    train, test = real_runs["train", "rademacher_16"], real_runs["test", "rademacher_16"]
    # no GRADPROJ_HOME, submitted from elsewhere: the script finds the installed package
    env = os.environ | {"GRADPROJ_PYTHON": sys.executable, "SLURM_SUBMIT_DIR": str(tmp_path)}
    env.pop("GRADPROJ_HOME", None)
    argv = ["bash", str(REPO / "score_influence.sbatch"), "cosine", str(real_runs["train_file"]),
            str(train), str(test), "-", "yes", "--output", str(tmp_path / "s")]  # fmt: skip
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    tensors, _ = read_scores(tmp_path / "s")
    assert list(tensors) == ["cosine"] and len(list((tmp_path / "s" / "mapped").iterdir())) > 0
