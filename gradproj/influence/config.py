"""The options of a scoring (`gradproj score`), and the ones `gradproj query` shares with it.

An option both commands describe alike is declared once, here, by a function that returns its
field (a dataclass field belongs to one class); `ScoringOptions` checks the shared options
(their choices are their `Literal` types) for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from gradproj import curvature, fsio
from gradproj.options import check_choices, device_option, option, require, resolve_device
from gradproj.scoredir import FUNCTIONS

FUNC_CHOICES = (*FUNCTIONS, "both")
PRECONDITIONERS = ("none", *curvature.KINDS)
PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}


def damping_option():
    return option(
        curvature.DEFAULT_DAMPING,
        "lambda as a multiple of each block's mean eigenvalue of G, from 1e-8 to 1e6",
    )


def curvature_option():
    return option(
        None,
        "the factorization file: read if it exists (it must be the train run's), else computed "
        "and written there (default: <train run>/curvature/<precondition>.safetensors)",
    )


class ScoringOptions:
    """What a config with the shared fields (func, top_k, device, memory_gb, precondition,
    damping, curvature) has in common: their checks, the device resolved, the functions."""

    def check_scoring_options(self) -> None:
        """The shared checks; resolves `device` (the last check: it asks torch for CUDA)."""
        check_choices(self)
        require(
            [
                (self.top_k >= 1, "--top_k must be at least 1"),
                (self.memory_gb is None or self.memory_gb > 0, "--memory_gb must be positive"),
            ]
        )
        curvature.check_options(self.damping, self.curvature)
        self.device = resolve_device(self.device)

    @property
    def functions(self) -> tuple[str, ...]:
        return FUNCTIONS if self.func == "both" else (self.func,)


@dataclass
class ScoreConfig(ScoringOptions):
    train: str = option(help="train run directory (gradproj extract)")
    test: str = option(help="test run directory")
    func: Literal[FUNC_CHOICES] = option("both", "score function(s)")
    output: str | None = option(None, "score directory (default: see above)")
    where: str | None = option(
        None, "replaces <train dataset>__<test dataset> in the default output"
    )
    mapped: bool = option(
        False, "also write mapped/<test row>.json, sorted, with the train samples' fields"
    )
    top_k: int = option(100, "top and bottom k per test example in topk.jsonl")
    device: str | None = device_option()
    dataset: str | None = option(None, "dataset for --mapped (default: the train run's)")
    precision: Literal[tuple(PRECISIONS)] = option(
        "fp32", "stored scores: fp32 (fp64 arithmetic, rounded once) or fp64"
    )
    memory_gb: float | None = option(
        None,
        "working memory budget in GiB (default: half the available host memory on CPU, 80%% of "
        "the free memory on CUDA)",
    )
    precondition: Literal[PRECONDITIONERS] = option(
        "none",
        "curvature correction: none (plain dot and cosine), gram (whiten both sides by (G + "
        "lambda I)^-1/2, G the train run's second moment, per module for params kronecker runs) "
        "or kfac (params kronecker runs: per module, the Kronecker product of the projected "
        "input and output-gradient covariances; reads the model once more); see docs/scoring.md",
    )
    damping: float = damping_option()
    curvature: str | None = curvature_option()

    def __post_init__(self):
        require(
            [
                (not (self.output and self.where), "give --output or --where, not both"),
                (self.dataset is None or self.mapped, "--dataset is only used with --mapped"),
                (
                    self.curvature is None or self.precondition != "none",
                    "--curvature is only used with --precondition",
                ),
            ]
        )
        self.check_scoring_options()
        if self.output is not None:  # before the lock file beside it is made
            fsio.check_output(self.output, "--output", directory=True)
