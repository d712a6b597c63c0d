"""The extraction command's options, validated in one place, and the outputs they ask for."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradproj import data, models
from gradproj.errors import UserError
from gradproj.projection import (
    FULL,
    PROJ_TYPES,
    OutputSpec,
    parse_dims,
    parse_outputs,
)
from gradproj.targets import TARGET_NAMES

MODES = ("store", "store_mean")
GRADIENT_TARGETS = ("embeddings", "params")
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Options that decide the bytes of a run: a rerun into the same directory must agree on them.
IDENTITY = (
    "model", "dataset", "dataset_split", "checkpoint_nr", "paradigm", "mode", "max_seq_length",
    "limit", "gradients_per_file", "proj_seed", "dtype", "save_dtype", "target",
)  # fmt: skip
PARAMS_DEFAULT_DIM = "16x16"  # kronecker, per layer
# What a gradient target listed after the first one stores (the projection options are the
# first one's): the parameter target's default kronecker projection, or the full gradient.
SECOND_TARGET_OUTPUTS = {
    "params": [OutputSpec("kronecker", PARAMS_DEFAULT_DIM)],
    "embeddings": [FULL],
}


@dataclass
class ExtractConfig:
    model: str
    dataset: str
    checkpoint_nr: int = 0
    dataset_split: str = "train"
    paradigm: str = "sft"
    mode: str = "store"
    random_projection: bool = False
    proj_dim: list | str | None = None  # None: the target's default (see _target_defaults)
    proj_type: str | list | None = None
    proj_seed: int = 42
    proj_memory_gb: float | None = None
    gradients_per_file: int = 1000
    gradients_output_path: str = "./gradients"
    skip_if_gradient_folder_exists: bool = False
    max_seq_length: int = 4096
    dtype: str = "auto"
    save_dtype: str = "fp32"
    device: str | None = None
    batch_tokens: int | None = None
    limit: int | None = None
    start: int | None = None
    end: int | None = None
    target: str = "embeddings"
    modules: str | list | None = None
    include_lm_head: bool = False
    full: bool = False
    skip_invalid_rows: bool = False

    def __post_init__(self):
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # CPU: small batches stay in cache (measured: 1024 tokens ran 2.3x faster than 8192)
        if self.batch_tokens is None:  # 0 is refused by validate, not taken for the default
            self.batch_tokens = 8192 if self.device.startswith("cuda") else 1024
        self.targets = self._parse_targets()
        # The projection options configure the first gradient target listed.
        self.primary = next((t for t in self.targets if t in GRADIENT_TARGETS), None)
        self._check_projection_options()
        self._target_defaults()
        self.proj_dim = parse_dims(self.proj_dim) if self.random_projection else ["full"]
        if self.full and "full" not in self.proj_dim:
            self.proj_dim.append("full")
        if isinstance(self.proj_type, str):
            self.proj_type = [t.strip() for t in self.proj_type.split(",") if t.strip()]
        self.validate()
        self.outputs = {name: self._outputs_of(name) for name in self.targets}

    def _parse_targets(self) -> list[str]:
        names = [t.strip() for t in str(self.target).split(",") if t.strip()]
        unknown = [t for t in names if t not in TARGET_NAMES]
        if unknown or not names or len(set(names)) < len(names):
            raise UserError(
                f"--target {self.target!r}: give one or more of embeddings, params, hidden, "
                "comma-separated, each once"
            )
        return names

    def validate(self) -> None:
        checks = [
            (self.paradigm in data.PARADIGMS, f"unknown paradigm {self.paradigm!r}"),
            (self.mode in MODES, f"unknown mode {self.mode!r}; use store or store_mean"),
            (
                bool(self.proj_type) and set(self.proj_type) <= set(PROJ_TYPES),
                f"unknown --proj_type {','.join(self.proj_type)!r}; use {', '.join(PROJ_TYPES)}",
            ),
            (self.max_seq_length >= 2, "--max_seq_length must be at least 2"),
            (self.gradients_per_file >= 1, "--gradients_per_file must be at least 1"),
            (self.batch_tokens >= 1, "--batch_tokens must be at least 1"),
            (self.limit is None or self.limit >= 0, "--limit must be >= 0"),
            (self.checkpoint_nr >= 0, "checkpoint_nr must be >= 0"),
            (self.save_dtype in SAVE_DTYPES, "--save_dtype must be fp32 or bf16"),
            (self.dtype in ("auto", *models.DTYPES), "--dtype must be auto, fp32, bf16 or fp16"),
            (
                self.primary is not None or self.proj_dim == ["full"],
                "--target hidden stores the mean last hidden state as is: drop --random_projection",
            ),
            (
                "params" in self.targets or (not self.modules and not self.include_lm_head),
                "--modules and --include_lm_head choose layers for --target params only",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if not self.device.startswith(("cpu", "cuda")):
            raise UserError(f"--device {self.device!r}: use cpu, cuda or cuda:N")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but no CUDA device is visible")

    def _outputs_of(self, name: str) -> list[OutputSpec]:
        """What one pass writes for a target, each output its own run directory."""
        if name == "hidden":
            return [FULL]
        if name == self.primary:
            return parse_outputs(self.proj_dim, self.proj_type)
        return SECOND_TARGET_OUTPUTS[name]

    def identity(self, target: str) -> dict:
        """What a run directory of `target` records as the options that decide its bytes."""
        identity = {key: getattr(self, key) for key in IDENTITY} | {"target": target}
        if target == "params":
            identity |= {"modules": self.modules, "include_lm_head": self.include_lm_head}
        return identity

    def _check_projection_options(self) -> None:
        """--proj_dim/--proj_type without a projection would be silently ignored: refuse."""
        projects = self.random_projection or (self.primary == "params" and not self.full)
        given = [f"--{k}" for k in ("proj_dim", "proj_type") if getattr(self, k) is not None]
        if given and not projects:
            raise UserError(
                f"{' and '.join(given)} without --random_projection would store only full "
                "gradients; add --random_projection (and 'full' in --proj_dim to keep them too)"
            )

    def _target_defaults(self) -> None:
        """--target params projects by default, with kronecker 16x16 per layer; --full alone
        stores the exact gradient instead. Unset options mean the embedding target's defaults."""
        params = self.primary == "params"
        if self.proj_type is None:
            self.proj_type = "kronecker" if params else "rademacher"
        if self.proj_dim is None:
            kronecker = params and "kronecker" in str(self.proj_type)
            self.proj_dim = [PARAMS_DEFAULT_DIM] if kronecker else [16384]
        if params and not self.full:
            self.random_projection = True
        if isinstance(self.modules, str):
            self.modules = [m.strip() for m in self.modules.split(",") if m.strip()] or None
