"""The memory plan of a scoring: how many stored bytes of the test and train sets one block
holds, so that a block, its fp64 copy and its scores fit the budget."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gradproj import store
from gradproj.errors import UserError
from gradproj.influence.config import ScoreConfig

# Bytes held per stored byte of a block: the block as read plus its fp64 copy on the device.
_FP64 = 8
# Score bytes per (test, train) pair on the device: fp64 dot and cosine, and their output copy.
_PAIR_BYTES = 3 * _FP64


@dataclass
class MemoryPlan:
    """Block sizes, in stored bytes, for the test set and the train set."""

    budget_bytes: int
    test_bytes: int
    train_bytes: int


def default_budget_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(0.8 * free)
    return int(0.5 * available_host_bytes())


def available_host_bytes() -> int:
    """MemAvailable (free plus reclaimable page cache); free pages where /proc is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class StoredLayout:
    """How a run stores its gradients: ragged `values` rows or one `vectors` row per example."""

    ragged: bool
    elem_bytes: int
    width: int  # k, or the hidden size of a ragged row
    mean_elems: int  # stored elements per example, on average


def stored_layout(run: store.Run) -> StoredLayout:
    ragged, elem, width = run.stored_rows()
    if not ragged:
        return StoredLayout(False, elem, width, width)
    tokens = [e.get("tokens", 1) for e in run.manifest.examples]
    return StoredLayout(True, elem, width, max(1, sum(tokens) // len(tokens)) * width)


def plan_memory(cfg: ScoreConfig, train: store.Run, test: store.Run) -> MemoryPlan:
    """Half the budget for a test block, half for a train block and its columns of scores."""
    budget = int(cfg.memory_gb * 2**30) if cfg.memory_gb else default_budget_bytes(cfg.device)
    test_layout, train_layout = stored_layout(test), stored_layout(train)
    # a block costs its stored bytes plus their fp64 copy
    test_bytes = max(1, budget // 2 * test_layout.elem_bytes // (test_layout.elem_bytes + _FP64))
    test_example = test_layout.mean_elems * test_layout.elem_bytes
    n_test = min(len(test.ids), max(1, test_bytes // test_example))
    per_example = train_layout.mean_elems * (train_layout.elem_bytes + _FP64)
    n_train = max(1, budget // 2 // (per_example + n_test * _PAIR_BYTES))
    return MemoryPlan(
        budget, test_bytes, n_train * train_layout.mean_elems * train_layout.elem_bytes
    )


def reserve(plan: MemoryPlan, nbytes: int) -> MemoryPlan:
    """The plan with `nbytes` (the whitening's eigenvectors) taken from its budget, or a
    UserError."""
    if nbytes > plan.budget_bytes // 2:
        raise UserError(
            f"the preconditioner's matrices need {nbytes / 2**30:.3g} GiB, more than half the "
            f"{plan.budget_bytes / 2**30:.3g} GiB memory budget; raise --memory_gb"
        )
    share = (plan.budget_bytes - nbytes) / plan.budget_bytes
    # a whitened block is a second fp64 copy: halve the blocks once more
    return MemoryPlan(plan.budget_bytes, max(1, int(plan.test_bytes * share / 2)),
                max(1, int(plan.train_bytes * share / 2)))  # fmt: skip
