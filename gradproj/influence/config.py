"""The options of a scoring (`gradproj score`), and the parts `gradproj query` shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradproj import curvature, store
from gradproj.errors import UserError
from gradproj.scoredir import FUNCTIONS

FUNC_CHOICES = (*FUNCTIONS, "both")
PRECONDITIONERS = ("none", *curvature.KINDS)
PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}


@dataclass
class ScoreConfig:
    train: str
    test: str
    func: str = "both"
    output: str | None = None
    where: str | None = None
    mapped: bool = False
    top_k: int = 100
    device: str | None = None
    dataset: str | None = None
    precision: str = "fp32"
    memory_gb: float | None = None
    precondition: str = "none"
    damping: float = curvature.DEFAULT_DAMPING
    curvature: str | None = None

    def __post_init__(self):
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.func in FUNC_CHOICES, f"--func {self.func!r}: use dot, cosine or both"),
            (self.top_k >= 1, "--top_k must be at least 1"),
            (self.precision in PRECISIONS, f"--precision {self.precision!r}: use fp32 or fp64"),
            (self.memory_gb is None or self.memory_gb > 0, "--memory_gb must be positive"),
            (not (self.output and self.where), "give --output or --where, not both"),
            (self.dataset is None or self.mapped, "--dataset is only used with --mapped"),
            (self.device.startswith(("cpu", "cuda")), f"--device {self.device!r}: use cpu, cuda"),
            (
                self.precondition in PRECONDITIONERS,
                f"--precondition {self.precondition!r}: use {', '.join(PRECONDITIONERS)}",
            ),
            (
                self.curvature is None or self.precondition != "none",
                "--curvature is only used with --precondition",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        curvature.check_options(self.damping, self.curvature)
        if self.output is not None:  # before the lock file beside it is made
            store.check_output(self.output, "--output", directory=True)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but no CUDA device is visible")

    @property
    def functions(self) -> tuple[str, ...]:
        return FUNCTIONS if self.func == "both" else (self.func,)
