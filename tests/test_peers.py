"""bench/peers (issue 32): the adapter that turns a peer's score matrix into a score directory
keeps ids and orientation; bench/peers/run.py runs end to end on the tiny model, with the
peers that are installed in bench/peers/.venv (none in CI: each is then listed with the
reason)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradproj import scoredir
from gradproj.analysis.lds import aligned_scores
from gradproj.cli import main
from gradproj.truth import load_ground_truth
from tests.conftest import write_jsonl
from tests.test_retrieval import MAX_LEN, extract, source_rows, toy_rows

PEERS_DIR = Path(__file__).resolve().parent.parent / "bench" / "peers"


def bench_module(name: str):
    if str(PEERS_DIR) not in sys.path:
        sys.path.insert(0, str(PEERS_DIR))  # run.py imports its siblings by name
    spec = importlib.util.spec_from_file_location(name, PEERS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def like_dir(path: Path, test_ids: list[str]) -> Path:
    """A minimal gradproj score directory to copy provenance from."""
    path.mkdir(parents=True)
    manifest = {
        "model": "m", "checkpoint": "c", "dataset": "d.jsonl", "split": "train",
        "max_seq_length": 40, "n_examples": 5, "examples_sha256": "x", "target": "params",
    }  # fmt: skip
    scoredir.write_summary(path, {"train_manifest": manifest, "test_manifest": manifest})
    lines = (json.dumps({"test_id": t, "test_index": 10 + i}) for i, t in enumerate(test_ids))
    scoredir.write_topk(path, lines)
    return path


def test_adapter_keeps_ids_and_orientation_of_a_planted_matrix(tmp_path):
    adapter = bench_module("adapter")
    train_ids = ["t_c", "t_a", "t_d", "t_b", "t_e"]  # not sorted: order must come from the ids
    test_ids = ["q_1", "q_0", "q_2"]
    planted = np.array([[10 * j + i for i in range(5)] for j in range(3)], dtype=np.float32)
    planted[1] = planted[1, ::-1]  # test q_0 ranks the train examples in reverse
    like = like_dir(tmp_path / "like", test_ids)
    peer = {"tool": "toy", "version": "0.0", "method": "planted", "settings": {}}
    written = {}
    for orientation, matrix in (("test_train", planted), ("train_test", planted.T.copy())):
        out = tmp_path / orientation
        adapter.write_peer_score_dir(
            matrix, orientation, train_ids, test_ids, out, peer, like, tmp_path / "src"
        )
        written[orientation] = sd = scoredir.load_score_dir(out)
        assert sd.train_ids == train_ids and sd.test_ids == test_ids
        np.testing.assert_array_equal(sd.scores["dot"], planted)
        assert sd.manifest["kind"] == "peer" and sd.manifest["model"] == "m"
        assert scoredir.scoring_label(sd.manifest, None) == "toy 0.0 · planted"
        topk = scoredir.read_topk(out)
        assert [r["test_id"] for r in topk] == test_ids
        assert [r["test_index"] for r in topk] == [10, 11, 12]
        assert topk[0]["dot"]["top_ids"] == train_ids[::-1]  # q_1: highest score last
        assert topk[1]["dot"]["top_ids"] == train_ids  # q_0: reversed
    np.testing.assert_array_equal(
        written["test_train"].scores["dot"], written["train_test"].scores["dot"]
    )
    with pytest.raises(ValueError, match="does not fit"):
        adapter.oriented(planted, "train_test", train_ids, test_ids)  # not transposed
    with pytest.raises(ValueError, match="orientation"):
        adapter.oriented(planted, "sideways", train_ids, test_ids)


def test_adapted_scores_are_aligned_to_a_ground_truth_by_id(tmp_path):
    """A peer's matrix in another order than the ground truth's is reordered by id."""
    adapter = bench_module("adapter")
    truth_like = type("T", (), {"train_ids": ["a", "b", "c"], "test_ids": ["x", "y"]})
    planted = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)  # rows y, x; cols c, a, b
    like = like_dir(tmp_path / "like", ["y", "x"])
    out = tmp_path / "peer"
    peer = {"tool": "toy", "version": "0", "method": "m"}
    adapter.write_peer_score_dir(
        planted, "test_train", ["c", "a", "b"], ["y", "x"], out, peer, like, tmp_path
    )
    aligned = aligned_scores(truth_like, scoredir.load_score_dir(out), "dot")
    np.testing.assert_array_equal(aligned, [[5, 6, 4], [2, 3, 1]])


@pytest.fixture(scope="module")
def tiny_bench(tiny_llama, tmp_path_factory):
    """The tiny model's train and test sets, a gradproj extraction of them in the demo's layout
    (embeddings full and rademacher 16, params kronecker 4x4) and a ground truth."""
    root = tmp_path_factory.mktemp("peers")
    train = write_jsonl(root / "train.jsonl", toy_rows())
    sources = {"q_0": "ex_000", "q_1": "ex_001", "q_2": "ex_002", "q_3": "ex_006"}
    test = write_jsonl(root / "test.jsonl", source_rows(sources))
    grads = root / "gradients"
    for dataset, split in ((train, "train"), (test, "test")):
        extract(tiny_llama, dataset, split, grads, "--random_projection", "--proj_dim", "full,16")
        extract(tiny_llama, dataset, split, grads, "--target", "params", "--random_projection",
                "--proj_type", "kronecker", "--proj_dim", "4x4")  # fmt: skip
    truth = root / "truth.safetensors"
    argv = ["retrain", "--model", str(tiny_llama), "--train_dataset", str(train),
            "--test_dataset", str(test), "--test_split", "test", "--output", str(truth),
            "--max_seq_length", str(MAX_LEN), "--n_subsets", "6", "--train_layers", "1",
            "--lr", "1e-2", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    return {"root": root, "train": train, "test": test, "gradients": grads, "truth": truth}


@pytest.mark.slow
def test_bench_peers_dry_run_end_to_end_on_the_tiny_model(tiny_llama, tiny_bench, tmp_path):
    run = bench_module("run")
    out = tmp_path / "out"
    run.main([
        "--out", str(out), "--gradients", str(tiny_bench["gradients"]),
        "--model", str(tiny_llama), "--train_dataset", str(tiny_bench["train"]),
        "--test_dataset", str(tiny_bench["test"]), "--ground_truth", str(tiny_bench["truth"]),
        "--max_seq_length", str(MAX_LEN), "--params_variant", "params_kronecker_4x4",
        "--embedding_dims", "16", "--n_permutations", "20", "--n_bootstrap", "200", "--dry-run",
    ])  # fmt: skip
    table = pd.read_csv(out / "table.csv")
    markdown = (out / "table.md").read_text()
    gradproj = table[table.tool == "gradproj"]
    assert {"bm25", "random"} <= set(gradproj.method)
    assert any("· gram" in m for m in gradproj.method)
    truth = load_ground_truth(tiny_bench["truth"])
    assert len(json.loads((out / "data.json").read_text())["train"]) == len(truth.train_ids)
    peers = list(run.PEERS)
    ran = []
    for name in peers:
        rows = table[table.tool.isin({name, {"trak": "traker"}.get(name, name)})]
        assert len(rows), f"{name} has no row"
        if "error" in rows and rows.error.notna().all():
            assert f"{name}" in markdown and "could not run" in markdown
        else:
            ran.append(name)
            assert np.isfinite(rows.lds.dropna()).all()
    if not ran:
        pytest.skip(
            "no peer installed in bench/peers/.venv: each is listed with its reason "
            f"({'; '.join(table.error.dropna().unique())[:200]})"
        )


def test_trak_block_size_is_the_largest_that_fits_the_memory_budget():
    """TRAK's CPU projector holds a [grad_dim, block_size] fp32 block: SmolLM2-135M's 210
    decoder layers (106,168,320 weights) at 8 GiB take 20 columns, not its default 100 (42.5 GB);
    a small gradient's matrix is one block; a budget below one column is refused."""
    block_size_within = bench_module("run_trak").block_size_within
    assert block_size_within(106_168_320, 2048, 8.0) == 20
    assert block_size_within(106_168_320, 2048, 100 * 106_168_320 * 4 / 2**30) == 100
    assert block_size_within(1000, 32, 8.0) == 32
    with pytest.raises(ValueError, match="holds no column"):
        block_size_within(106_168_320, 2048, 0.3)
