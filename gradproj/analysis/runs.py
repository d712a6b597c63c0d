"""Full-gradient runs (from extract_gradients.py) as needed by the theory and the emulation."""

from pathlib import Path

import numpy as np
import torch

from gradproj.analysis.original import GradientPair
from gradproj.errors import UserError
from gradproj.store import Run


def open_full_run(path: str | Path) -> Run:
    run = Run(path)
    if run.kind != "full":
        raise UserError(f"{path} holds {run.kind} gradients; the emulation needs a full run")
    run.require_complete()
    return run


def grad_norms(run: Run, ids: list[str]) -> np.ndarray:
    """Per-example gradient norms from the manifest, in the order of `ids`."""
    by_id = {e["id"]: e.get("grad_norm") for e in run.manifest.examples}
    missing = [i for i in ids if by_id.get(i) is None]
    if missing:
        raise UserError(f"{run.path}: no grad_norm for examples {missing[:3]} in the manifest")
    return np.array([by_id[i] for i in ids], dtype=np.float64)


def ragged_rows(run: Run, ids: list[str]) -> list[torch.Tensor]:
    """The `[len, hidden]` fp32 gradient rows of each example, in the order of `ids`."""
    rows = {}
    for shard in run.iter_shards():
        for i, example_id in enumerate(shard.ids):
            rows[example_id] = shard.rows(i).float()
    missing = [i for i in ids if i not in rows]
    if missing:
        raise UserError(f"{run.path} lacks the gradients of {missing[:3]} named in the scores")
    return [rows[i] for i in ids]


def load_gradient_pair(
    train_run: str | Path, test_run: str | Path, train_ids: list[str], test_ids: list[str]
) -> GradientPair:
    """Train and test full gradients, aligned to the score matrices' ids."""
    train, test = open_full_run(train_run), open_full_run(test_run)
    if train.manifest.max_seq_length != test.manifest.max_seq_length:
        raise UserError(f"{train_run} and {test_run} differ in max_seq_length")
    return GradientPair(
        train_ids=list(train_ids),
        train_rows=ragged_rows(train, train_ids),
        test_ids=list(test_ids),
        test_rows=ragged_rows(test, test_ids),
        max_seq_length=int(train.manifest.max_seq_length),
    )


def load_fp16_gradient_pair(
    train_run: str | Path, test_run: str | Path, train_ids: list[str], test_ids: list[str]
) -> GradientPair:
    """The gradients of the model run in fp16 (the original's), from runs made with --dtype fp16."""
    for path in (train_run, test_run):
        dtype = (Run(path).manifest.options or {}).get("dtype")
        if dtype != "fp16":
            raise UserError(
                f"--fp16_runs {path} was extracted with --dtype {dtype}; "
                "extract it again with --dtype fp16"
            )
    return load_gradient_pair(train_run, test_run, train_ids, test_ids)
