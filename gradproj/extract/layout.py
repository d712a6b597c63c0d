"""Where an extraction's outputs go: one run directory per target and output, in the original
study's layout `<variant>/<model>/<dataset>/<split>/<checkpoint>`."""

from __future__ import annotations

import re
import sys
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
    """A rerun into a run directory must agree on the options that decide its bytes: those its
    manifest records or, with the manifest lost or unreadable, those its shards record (the
    manifest is then rebuilt from the shards, and this says so)."""
    for (target, spec), path in dirs.items():
        problem = store.manifest_problem(path)
        if problem is None:
            previous = store.Run(path).manifest.identity or {}
        elif store.shard_files(path):
            previous = shards_identity(path, cfg.run_identity(target) | {"output": spec.name})
            print(
                f"note: {path} {problem}; it is rebuilt from the metadata of its shards",
                file=sys.stderr,
            )
        else:
            continue
        diff = [k for k, v in cfg.run_identity(target).items() if previous.get(k) != v]
        if diff:
            raise UserError(
                f"{path} holds a run with different options ({', '.join(diff)}); "
                "use another --gradients_output_path or delete that run"
            )


def shards_identity(path: Path, identity: dict) -> dict:
    """The identity the shards of a run without a readable manifest record: `identity` when
    they agree with it, else that of the first one that does not."""
    expected = store.options_sha256(identity)
    for shard in store.shard_files(path):
        try:
            run = store.read_shard_metadata(shard).get("run") or {}
        except Exception:
            continue  # damaged: recomputed
        if run.get("identity_sha256", expected) != expected:
            return run.get("identity", {})
    return identity


def is_complete(path: Path, rows: list[tuple[int, str]]) -> bool:
    """Whether a run directory is complete (`store.VerifyReport.ok`) and holds `rows`, the
    (index, id) of every chosen dataset row."""
    if store.manifest_problem(path) is not None:
        return False
    run = store.Run(path)
    held = [(e["index"], e["id"]) for e in run.manifest.examples + run.manifest.skipped]
    mean = run.manifest.mode == "store_mean"  # one example stands for all the rows
    return (
        run.manifest.n_examples == len(rows) and (mean or sorted(held) == rows) and run.verify().ok
    )
