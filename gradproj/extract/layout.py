"""Where an extraction's outputs go: one run directory per target and output, in the original
study's layout `<variant>/<model>/<dataset>/<split>/<checkpoint>`."""

from __future__ import annotations

import re
from pathlib import Path

from gradproj import models, store
from gradproj.errors import UserError
from gradproj.extract.config import ExtractConfig
from gradproj.projection import OutputSpec


def path_component(name: str) -> str:
    """A hub id keeps its owner/name nesting, as the original layout; a local path its name."""
    if name.startswith(models.BUNDLED_PREFIX):
        return name.removeprefix(models.BUNDLED_PREFIX)
    path = Path(name)
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return name


def variant(target: str, spec: OutputSpec) -> str:
    """`full`, `rademacher_8192`; `params_...` (never shares a directory with an embedding
    run); `hidden`."""
    if target == "hidden":
        return "hidden"
    return f"params_{spec.name}" if target == "params" else spec.name


def run_dir(cfg: ExtractConfig, target: str, spec: OutputSpec) -> Path:
    name = variant(target, spec)
    if cfg.mode == "store_mean":
        name += "_mean"
    split = re.sub(r"[^\w.-]+", "_", cfg.dataset_split).strip("_")
    return (
        Path(cfg.gradients_output_path)
        / name
        / path_component(cfg.model)
        / path_component(cfg.dataset)
        / split
        / str(cfg.checkpoint_nr)
    )


def run_dirs(cfg: ExtractConfig) -> dict[tuple[str, OutputSpec], Path]:
    """Every run directory one pass writes, by (target, output)."""
    return {
        (target, spec): run_dir(cfg, target, spec)
        for target, specs in cfg.outputs.items()
        for spec in specs
    }


def check_existing(cfg: ExtractConfig, dirs: dict) -> None:
    """A rerun into a run directory must agree on the options that decide its bytes."""
    for (target, _), path in dirs.items():
        if not (path / store.MANIFEST).is_file():
            continue
        previous = store.Run(path).manifest.get("identity", {})
        diff = [k for k, v in cfg.identity(target).items() if previous.get(k) != v]
        if diff:
            raise UserError(
                f"{path} holds a run with different options ({', '.join(diff)}); "
                "use another --gradients_output_path or delete that run"
            )


def is_complete(path: Path, n_rows: int) -> bool:
    """Whether a run directory already holds every shard of `n_rows` rows, as its manifest says."""
    if not (path / store.MANIFEST).is_file():
        return False
    run = store.Run(path)
    listed = {s["file"] for s in run.manifest.get("shards", [])}
    return (
        run.manifest.get("complete") is True
        and run.manifest.get("n_examples") == n_rows
        and listed == set(run.expected_shards())
        and run.verify().ok
    )


def shard_is_valid(run_dir: Path, start: int, end: int, recorded: dict[str, str]) -> bool:
    """A shard counts as done when its file matches its recorded (or its own) checksum."""
    path = run_dir / store.shard_name(start, end)
    if not path.is_file():
        return False
    if path.name in recorded:
        return store.file_sha256(path) == recorded[path.name]
    return store.check_shard(path) is not None
