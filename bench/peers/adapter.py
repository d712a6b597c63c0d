"""A peer's score matrix as a gradproj score directory (run with the gradproj venv).

A peer runner leaves `result.npz` (`scores`, and `orientation`: `test_train` for a
`[n_test, n_train]` matrix, `train_test` for `[n_train, n_test]`) and `peer.json` (the tool, its
version, the method, the train and test ids in the matrix's order, ...). `write_peer_score_dir`
turns the matrix into `[n_test, n_train]` with the ids along each axis, and writes
scores.safetensors (function `dot`: higher = the train example lowers the test loss more, which
every runner checks for its peer), topk.jsonl and summary.json through `gradproj.scoredir`, so
that `gradproj compare --lds` reads it like any scoring.

Provenance: the summary's `train_manifest` / `test_manifest` copy the fields that
`gradproj compare` checks (model, checkpoint, dataset, split, max_seq_length, n_examples,
examples_sha256, ...) from a gradproj score directory of the same examples (`like`), and say
what they are not: `kind` is `peer`, `target` the tool, `projection` none, `peer` the tool,
version, method and settings, `label` the name tables print. No train or test run is recorded
(`train_run`/`test_run` name the peer's result folder): the peer computed its own gradients.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gradproj import fsio, scoredir

PROVENANCE_FIELDS = (
    "model", "checkpoint", "checkpoint_nr", "dataset", "split", "mode", "max_seq_length",
    "n_examples", "examples_sha256", "hidden_size",
)  # fmt: skip
ORIENTATIONS = ("test_train", "train_test")


def oriented(
    matrix: np.ndarray, orientation: str, train_ids: list[str], test_ids: list[str]
) -> np.ndarray:
    """`[n_test, n_train]` fp32, refusing a shape that does not fit the ids as oriented."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation {orientation!r} is not one of {ORIENTATIONS}")
    matrix = np.asarray(matrix, dtype=np.float32)
    if orientation == "train_test":
        matrix = matrix.T
    expected = (len(test_ids), len(train_ids))
    if matrix.shape != expected:
        raise ValueError(
            f"a {orientation} matrix of shape {matrix.shape} does not fit {len(train_ids)} train "
            f"and {len(test_ids)} test ids ([n_test, n_train] = {expected})"
        )
    for side, ids in (("train", train_ids), ("test", test_ids)):
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate {side} ids")
    return np.ascontiguousarray(matrix)


def peer_label(peer: dict) -> str:
    return f"{peer['tool']} {peer['version']} · {peer['method']}"


def peer_manifest(like: dict, peer: dict) -> dict:
    kept = {k: like[k] for k in PROVENANCE_FIELDS if k in like}
    return {
        **kept,
        "kind": "peer",
        "target": peer["tool"],
        "projection": None,
        "label": peer_label(peer),
        "peer": {k: peer.get(k) for k in ("tool", "version", "method", "settings")},
    }


def write_peer_score_dir(
    matrix: np.ndarray,
    orientation: str,
    train_ids: list[str],
    test_ids: list[str],
    out: Path,
    peer: dict,
    like: Path,
    source: Path,
    top_k: int = 10,
) -> Path:
    """Write the score directory `out` from a peer's matrix; `like` is a gradproj score directory
    of the same train and test examples (its run provenance is copied), `source` the peer's
    result folder."""
    scores = oriented(matrix, orientation, train_ids, test_ids)
    reference = scoredir.read_summary(like)
    like_topk = {r["test_id"]: r["test_index"] for r in scoredir.read_topk(like)}
    test_rows = [like_topk.get(i, -1) for i in test_ids]
    tensor = torch.from_numpy(scores)
    matrices = {"dot": tensor}
    k = min(top_k, len(train_ids))
    order = np.argsort(-scores, axis=1, kind="stable")
    low = np.argsort(scores, axis=1, kind="stable")
    positions = {"dot": (order[:, :k].tolist(), low[:, :k].tolist())}
    summary = {
        "counts": {"train": len(train_ids), "test": len(test_ids)},
        "test_ids": list(test_ids),
        "per_test": {
            "dot": {
                "mean": scores.astype(np.float64).mean(axis=1).tolist(),
                "std": scores.astype(np.float64).std(axis=1).tolist(),
            }
        },
        "functions": ["dot"],
        "precision": "fp32",
        "options": {"peer_result": str(source)},
        "train_run": str(source),
        "test_run": str(source),
        "train_manifest": peer_manifest(reference.get("train_manifest") or {}, peer),
        "test_manifest": peer_manifest(reference.get("test_manifest") or {}, peer),
        "peer": peer,
    }

    def build(staging: Path) -> None:
        scoredir.write_scores(staging, matrices, list(train_ids), list(test_ids), source, source)
        lines = scoredir.topk_lines(matrices, list(train_ids), list(test_ids), test_rows, positions)
        scoredir.write_topk(staging, lines)
        scoredir.write_summary(staging, summary)

    out = Path(out)
    with scoredir.exclusive_output(out):
        fsio.replace_dir(out, build)
    return out


def from_result(folder: Path, out: Path, like: Path) -> Path:
    """The score directory of a runner's result folder (result.npz + peer.json)."""
    peer = json.loads((folder / "peer.json").read_text())
    with np.load(folder / "result.npz") as result:
        matrix, orientation = result["scores"], str(result["orientation"])
    return write_peer_score_dir(
        matrix, orientation, peer["train_ids"], peer["test_ids"], out, peer, like, folder
    )
