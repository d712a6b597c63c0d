"""Where a scoring comes from: its runs (opened, checked comparable), its default output
directory, its summary.json, and whether a score directory already holds it."""

from __future__ import annotations

import re
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from gradproj import __version__, fsio, scoredir, store
from gradproj.errors import UserError, check_unique_ids
from gradproj.influence.config import ScoreConfig
from gradproj.influence.kernel import Scores, Scoring

# Options recorded in summary.json only when preconditioning: plain scorings keep their bytes.
PRECONDITION_OPTIONS = ("precondition", "damping", "curvature")
MANIFEST_FIELDS = (
    "kind", "projection", "model", "checkpoint", "checkpoint_nr", "target", "dataset", "split",
    "mode", "hidden_size", "max_seq_length", "n_examples",
)  # fmt: skip
REQUIRED_FIELDS = ("kind", "model", "checkpoint", "target", "shards", "examples", "skipped")


def open_run(path: str, role: str) -> store.Run:
    """A complete, non-empty run, or a UserError that names the role and what is wrong."""
    try:
        run = store.Run(path)
        missing = run.manifest.lacks(REQUIRED_FIELDS)
        if missing:
            raise UserError(f"{path}: manifest.json lacks {', '.join(missing)}; re-extract")
        run.require_complete()
        check_unique_ids(run.ids, f"run {path}")
    except UserError as err:
        raise UserError(f"--{role}: {err}") from None
    return run


def scoring_identity(manifest: store.Manifest) -> dict:
    """What two runs must share for their gradients to be comparable."""
    projection = manifest.projection or {}
    fields = {
        "model": manifest.model,
        "checkpoint": manifest.checkpoint,
        "target": manifest.target,
        "hidden_size": manifest.hidden_size,
        "projection type": projection.get("type", "full"),
        "projection seed": projection.get("seed"),
        "projection dim": projection.get("dim"),
        "projection generator": projection.get("generator"),
        "projection scale": projection.get("scale"),
    }
    if projection.get("type") == "kronecker":  # its factors depend on the gradient's shape
        fields["projection shape"] = projection.get("shape")
    if manifest.target == "params":  # vectors of different layers are not comparable
        fields["modules"] = [m["name"] for m in manifest.modules]
    return fields


def check_compatible(train: store.Run, test: store.Run) -> None:
    a, b = scoring_identity(train.manifest), scoring_identity(test.manifest)
    keys = list(dict.fromkeys([*a, *b]))
    differences = [f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]
    if differences:
        raise UserError(
            f"train and test runs differ in {'; '.join(differences)}: their gradients are not "
            "comparable; extract both with the same model, checkpoint, target and projection"
        )


def warn_truncation(train: store.Run, test: store.Run) -> None:
    """Runs of different --max_seq_length are comparable, but their examples were cut at
    different lengths (for the embedding target, position-aligned gradients of different
    prefixes): scored, with a warning."""
    lengths = train.manifest.max_seq_length, test.manifest.max_seq_length
    if None not in lengths and lengths[0] != lengths[1]:
        print(
            f"warning: the train run was extracted with max_seq_length {lengths[0]} and the "
            f"test run with {lengths[1]}: examples longer than {min(lengths)} tokens were cut "
            "at different lengths; extract both with one --max_seq_length to compare like "
            "with like",
            file=sys.stderr,
        )


def dataset_label(manifest: store.Manifest) -> str:
    name = str(manifest.dataset or "dataset").rstrip("/")
    name = Path(name).stem if Path(name).suffix in (".json", ".jsonl", ".parquet") else name
    label = name.rsplit("/", 1)[-1]
    split = str(manifest.split or "train")
    if split != "train":
        label += "_" + re.sub(r"[^\w.-]+", "_", split).strip("_")
    return label


def output_dir(cfg: ScoreConfig, train: store.Run, test: store.Run) -> Path:
    if cfg.output:
        return Path(cfg.output)
    projection = train.manifest.projection
    dim = str(projection["dim"]) if projection else "full"
    if projection and projection["type"] != "rademacher":
        # the original layout names the dim only; other types must not overwrite rademacher's
        dim = f"{projection['type']}_{dim}"
    if cfg.precondition != "none":  # never overwrite the plain scores of the same runs
        dim += f"_{cfg.precondition}"
    where = cfg.where or f"{dataset_label(train.manifest)}__{dataset_label(test.manifest)}"
    return Path("explainability") / dim / where / cfg.func


def per_test_stats(scores: Scores) -> dict:
    """Mean and population std (ddof 0) over the train examples, in fp64, per test example."""
    stats = {}
    for name, matrix in scores.matrices.items():
        values = matrix.to(torch.float64)
        stats[name] = {
            "mean": values.mean(1).tolist(),
            "std": values.std(1, correction=0).tolist(),
        }
    return stats


def manifest_summary(run: store.Run) -> dict:
    """The run's description; `examples_sha256` names its examples (dataset rows and ids, kept
    and skipped), so that `gradproj compare` can tell scorings of other examples apart."""
    described = {key: getattr(run.manifest, key) for key in MANIFEST_FIELDS}
    return described | {
        "manifest_sha256": fsio.file_sha256(run.path / store.MANIFEST),
        "examples_sha256": store.examples_sha256(run.manifest),
    }


def scoring_summary(cfg: ScoreConfig, scoring: Scoring, train: store.Run, test: store.Run) -> dict:
    scores, plan, whitening = scoring.scores, scoring.plan, scoring.whitening
    options = asdict(cfg)
    if cfg.precondition == "none":
        options = {k: v for k, v in options.items() if k not in PRECONDITION_OPTIONS}
    return {
        "functions": list(cfg.functions),
        "precision": cfg.precision,
        "counts": {
            "train": len(scores.train_ids),
            "test": len(scores.test_ids),
            "train_excluded": len(scores.excluded["train"]),
            "test_excluded": len(scores.excluded["test"]),
        },
        "excluded": scores.excluded,
        "test_ids": scores.test_ids,
        "per_test": per_test_stats(scores),
        "blocks": scores.blocks | {"memory_budget_bytes": plan.budget_bytes},
        "options": options,
        "train_run": str(train.path.resolve()),
        "test_run": str(test.path.resolve()),
        "train_manifest": manifest_summary(train),
        "test_manifest": manifest_summary(test),
        "versions": {"gradproj": __version__},
    } | ({"preconditioner": whitening} if whitening else {})


# Options that change what a scoring writes; the rest (where it goes, the device, the memory
# budget, which sets only the block sizes) do not.
SCORING_OPTIONS = ("func", "mapped", "top_k", "dataset", "precision")


def scoring_inputs(summary: dict) -> dict:
    """What a score directory's content depends on: the runs (their manifests' checksums, which
    cover every shard's), the options that change the output, the gradproj that scored."""
    return {
        "runs": [summary.get("train_run"), summary.get("test_run")],
        "manifests": [
            (summary.get(role) or {}).get("manifest_sha256")
            for role in ("train_manifest", "test_manifest")
        ],
        "options": {key: (summary.get("options") or {}).get(key) for key in SCORING_OPTIONS},
        "gradproj": (summary.get("versions") or {}).get("gradproj"),
    }


def up_to_date(out: Path, cfg: ScoreConfig, train: store.Run, test: store.Run) -> bool:
    """Whether `out` holds a scoring of these runs, as they are now, with these options.
    Preconditioned scorings are always redone: they also depend on a factorization file."""
    if cfg.precondition != "none":
        return False
    if not (out / scoredir.SCORES_FILE).is_file() or not scoredir.is_score_dir(out):
        return False
    wanted = {
        "train_run": str(train.path.resolve()),
        "test_run": str(test.path.resolve()),
        "train_manifest": manifest_summary(train),
        "test_manifest": manifest_summary(test),
        "options": asdict(cfg),
        "versions": {"gradproj": __version__},
    }
    return scoring_inputs(scoredir.read_summary(out)) == scoring_inputs(wanted)
