"""Running under SLURM: this task's share of a job array, and stopping cleanly when SLURM
warns of a kill (preemption, time limit, scancel)."""

from __future__ import annotations

import os
import signal
import sys

from gradproj import store
from gradproj.errors import UserError
from gradproj.extract.config import ExtractConfig


def task_range(cfg: ExtractConfig, n: int) -> tuple[int, int]:
    """This process's example range: --start/--end, else its SLURM array share, else all.

    A range is widened to whole shards: each bound is rounded up to a multiple of
    --gradients_per_file (at most n), so processes whose ranges partition the dataset also
    partition its shards, and no two of them ever write the same shard. Array tasks get
    contiguous runs of whole shards; a task left without any (more tasks than shards) gets the
    empty range n..n and exits cleanly.
    """
    if cfg.start is not None or cfg.end is not None:
        start = cfg.start or 0
        end = max(n, start) if cfg.end is None else cfg.end
        if start < 0 or end < start:
            raise UserError(f"--start {start} / --end {end} is not a range of example indices")
        per = cfg.gradients_per_file
        aligned = tuple(min(n, -(-x // per) * per) for x in (start, end))
        if aligned != (start, min(end, n)):
            print(
                f"examples {start}..{end} rounded up to shard boundaries (multiples of {per}): "
                f"{aligned[0]}..{aligned[1]} of {n}",
                file=sys.stderr,
            )
        return aligned
    share = array_share()
    if share is None:
        return 0, n
    rank, count = share
    shards = store.shard_ranges(0, n, cfg.gradients_per_file)
    mine = shards[rank * len(shards) // count : (rank + 1) * len(shards) // count]
    return (mine[0][0], mine[-1][1]) if mine else (n, n)


def array_share() -> tuple[int, int] | None:
    """(rank, count) of this SLURM array task among its array, or None outside an array.

    Works from SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_MIN/MAX/STEP and/or COUNT, for any
    evenly spaced array (--array=0-N, 1-N, 0-N:step, with or without a %limit).
    """
    env = os.environ
    if env.get("SLURM_ARRAY_TASK_ID") is None:
        return None
    try:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        step = int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
        count = int(env["SLURM_ARRAY_TASK_COUNT"]) if env.get("SLURM_ARRAY_TASK_COUNT") else None
        lo = int(env.get("SLURM_ARRAY_TASK_MIN") or 0)
        if env.get("SLURM_ARRAY_TASK_MAX"):
            hi = int(env["SLURM_ARRAY_TASK_MAX"])
        elif count is not None:
            hi = lo + (count - 1) * step
        else:
            raise ValueError("neither SLURM_ARRAY_TASK_MAX nor SLURM_ARRAY_TASK_COUNT is set")
    except ValueError as err:
        raise UserError(f"cannot read this SLURM array task's position: {err}") from err
    if count is None:
        count = (hi - lo) // step + 1 if step > 0 else 0
    spaced = step >= 1 and count >= 1 and hi - lo == (count - 1) * step
    if not (spaced and lo <= task <= hi and (task - lo) % step == 0):
        raise UserError(
            f"SLURM array task {task} of ids {lo}..{hi} (step {step}, {count} tasks) is not part "
            "of an evenly spaced array; submit with --array=0-N (optionally :STEP or %LIMIT), "
            "or give each job --start/--end"
        )
    return (task - lo) // step, count


class Preemption:
    """SIGTERM/SIGUSR1 (SLURM's warning before a kill) stop the run at the next batch."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None


class Stopped(Exception):
    pass
