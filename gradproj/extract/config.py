"""The extraction command's options, validated in one place, and the outputs they ask for."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradproj import data, models
from gradproj.errors import UserError
from gradproj.options import device_option, option, require, resolve_device
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
    model: str = option(help="hub id, local directory, or bundled:<name>", positional=True)
    dataset: str = option(
        help="hub id, .json/.jsonl/.parquet, or save_to_disk dir",
        positional=True,
    )
    checkpoint_nr: int = option(0, "index into the model's checkpoints", positional=True)
    dataset_split: str = option("train", "split or slice, e.g. train[0:100]")
    paradigm: str = option("sft", "sft, pre or mlm")
    mode: str = option("store", "store (each gradient) or store_mean")
    random_projection: bool = option(False, "project the gradients")
    # None: the target's default (see _target_defaults)
    proj_dim: list | str | None = option(
        None,
        "dims, comma-separated; 'full' adds the full gradient (default 16384; with --target "
        "params and kronecker: per layer, e.g. 16x16, the default)",
    )
    proj_type: str | list | None = option(
        None,
        "rademacher, normal, sjlt, kronecker (default rademacher; kronecker for params)",
    )
    proj_seed: int = option(42, "seed of the random projection")
    proj_memory_gb: float | None = option(None, "projection memory budget")
    gradients_per_file: int = option(1000, "examples per shard")
    gradients_output_path: str = option("./gradients", "root of the run directories")
    skip_if_gradient_folder_exists: bool = option(
        False,
        "do nothing when every output directory exists",
    )
    max_seq_length: int = option(4096, "truncate each example to this many tokens")
    dtype: str = option("auto", "model dtype: auto (fp32 CPU, bf16 CUDA), fp32, bf16, fp16")
    save_dtype: str = option("fp32", "full gradients on disk: fp32 or bf16")
    device: str | None = device_option()
    batch_tokens: int | None = option(None, "token budget per batch (1024 on CPU, 8192 on CUDA)")
    limit: int | None = option(None, "only the first N examples")
    start: int | None = option(None, "first example of this task's range")
    end: int | None = option(None, "end (exclusive) of this task's range")
    target: str = option(
        "embeddings",
        "embeddings (d loss / d input embeddings), params (weights of linear layers; projected "
        "by default, see docs/projection.md) or hidden (no gradient: the mean last hidden state,"
        " a representation baseline); several, comma-separated, share one pass: the projection "
        "options then apply to the first gradient target listed, and a second takes its default "
        "(params: kronecker 16x16; embeddings: full)",
        metavar="TARGET[,TARGET...]",
    )
    modules: str | list | None = option(
        None,
        "params: linear layers by name, e.g. '*.mlp.*' (default: all but the LM head)",
        metavar="GLOB[,GLOB...]",
    )
    include_lm_head: bool = option(False, "params: add the LM head")
    full: bool = option(
        False,
        "add the exact gradient; with --target params and no --random_projection, only it",
    )
    skip_invalid_rows: bool = option(
        False,
        "record rows the paradigm cannot use in the manifest's skipped, and go on",
    )

    def __post_init__(self):
        self.device = resolve_device(self.device)
        # CPU: small batches stay in cache (measured: 1024 tokens ran 2.3x faster than 8192)
        if self.batch_tokens is None:  # 0 is refused by _check_values, not taken for the default
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
        self._check_values()
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

    def _check_values(self) -> None:
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
        require(checks)

    def _outputs_of(self, name: str) -> list[OutputSpec]:
        """What one pass writes for a target, each output its own run directory."""
        if name == "hidden":
            return [FULL]
        if name == self.primary:
            return parse_outputs(self.proj_dim, self.proj_type)
        return SECOND_TARGET_OUTPUTS[name]

    def run_identity(self, target: str) -> dict:
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
