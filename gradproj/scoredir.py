"""Score directories: the one owner of their format (docs/formats.md, "Score directory").

A score directory holds `scores.safetensors` (one `[n_test, n_train]` matrix per function and one
metadata key), `topk.jsonl`, `summary.json` and, when mapped, `mapped/`. `gradproj.influence`
computes what goes in; this module names the files, writes them (into a staging directory that
`fsio.replace_dir` swaps in whole, under `exclusive_output`) and reads them back, refusing a
format version it does not know.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import safe_open

from gradproj import __version__, fsio
from gradproj.curvature import DEFAULT_DAMPING
from gradproj.errors import UserError

if TYPE_CHECKING:
    import torch

SCORES_FORMAT = "gradproj-scores/1"
SCORES_FILE = "scores.safetensors"
TOPK_FILE = "topk.jsonl"
SUMMARY_FILE = "summary.json"
MAPPED_DIR = "mapped"
FUNCTIONS = ("dot", "cosine")


# --- Writing ---


def write_scores(
    folder: Path,
    matrices: dict[str, torch.Tensor],
    train_ids: list[str],
    test_ids: list[str],
    train_run: Path,
    test_run: Path,
) -> None:
    """scores.safetensors: the matrices, and the ids and runs as its one metadata key."""
    info = {
        "format": SCORES_FORMAT,
        "train_ids": train_ids,
        "test_ids": test_ids,
        "train_run": str(train_run.resolve()),
        "test_run": str(test_run.resolve()),
    }
    tensors = {name: m.contiguous() for name, m in matrices.items()}
    fsio.write_safetensors(tensors, folder / SCORES_FILE, info)


def topk_lines(
    matrices: dict[str, torch.Tensor],
    train_ids: list[str],
    test_ids: list[str],
    test_index: list[int],
    positions: dict[str, tuple[list[list[int]], list[list[int]]]],
) -> Iterator[str]:
    """topk.jsonl's lines; `positions[func]` holds each test row's top and bottom train columns."""
    for j, test_id in enumerate(test_ids):
        line = {"test_id": test_id, "test_index": test_index[j]}
        for name, matrix in matrices.items():
            top, bottom = positions[name][0][j], positions[name][1][j]
            line[name] = {
                "top_ids": [train_ids[i] for i in top],
                "top_scores": matrix[j, top].tolist(),
                "bottom_ids": [train_ids[i] for i in bottom],
                "bottom_scores": matrix[j, bottom].tolist(),
            }
        yield json.dumps(line)


def write_topk(folder: Path, lines: Iterable[str]) -> None:
    fsio.atomic_write_bytes(folder / TOPK_FILE, "".join(line + "\n" for line in lines).encode())


def write_summary(folder: Path, summary: dict) -> None:
    """summary.json: the format version first, then `summary`."""
    fsio.atomic_write_json(folder / SUMMARY_FILE, {"format": SCORES_FORMAT, **summary})


def mapped_json(entries: Iterable[tuple[float, str]]) -> str:
    """The original study's file: a JSON list of `{"score": s, <fields>}`, in the given order;
    each entry is a score and its train sample's fields as a JSON object body."""
    objects = []
    for score, body in entries:
        objects.append('{"score": ' + json.dumps(score) + (", " + body if body else "") + "}")
    return "[\n" + ",\n".join(objects) + "\n]\n"


def write_mapped_file(
    folder: Path, func: str, test_index: int, entries: Iterable[tuple[float, str]], several: bool
) -> None:
    """mapped/<test row>.json, or mapped/<func>/<test row>.json when `several` functions."""
    root = folder / MAPPED_DIR / func if several else folder / MAPPED_DIR
    fsio.atomic_write_bytes(root / f"{test_index}.json", mapped_json(entries).encode())


# --- Replacing a score directory whole ---


def check_replaceable(out: Path) -> None:
    """A score directory is replaced whole: refuse one that holds anything but a scoring."""
    fsio.check_output(out, "--output", directory=True)
    if out.is_dir() and any(out.iterdir()) and not is_score_dir(out):
        raise UserError(
            f"--output {out} holds files that are not the output of gradproj score "
            "(score_influence.py), and scoring replaces the directory whole; give a new or empty "
            "directory"
        )


def is_score_dir(path: Path) -> bool:
    try:
        return json.loads((path / SUMMARY_FILE).read_text()).get("format") == SCORES_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def exclusive_output(out: Path) -> Iterator[None]:
    """Hold the one writer's lock of the score directory `out`, or fail at once.

    The lock is a `fsio.file_lock` on `.<name>.lock` beside `out`; it dies with its holder, so
    a killed scoring never blocks the next. While it is held, SIGTERM unwinds like Ctrl-C (the
    staging directory of `fsio.replace_dir` is removed) and any staging directory beside `out`
    belongs to a dead process, so it is removed; a swap interrupted between its two renames is
    undone.
    """
    lock = out.parent / f".{out.name}.lock"
    with fsio.file_lock(lock, wait=False) as held:
        if not held:
            raise UserError(
                f"another scoring is writing --output {out} (it holds {lock}); wait for it to "
                "finish, or give another --output"
            )
        fsio.remove_dead_leftovers(out, is_score_dir)
        with fsio.sigterm_unwinds():
            yield


# --- Reading ---


@dataclass
class ScoreDir:
    """One score directory: fp32 `[n_test, n_train]` matrices per function, ids and provenance."""

    path: Path
    scores: dict[str, np.ndarray]
    train_ids: list[str]
    test_ids: list[str]
    summary: dict
    metadata: dict = field(default_factory=dict)

    @property
    def manifest(self) -> dict:
        return self.summary.get("train_manifest") or {}

    @property
    def projection(self) -> dict | None:
        return self.manifest.get("projection")

    @property
    def projection_type(self) -> str:
        return self.projection["type"] if self.projection else "full"

    @property
    def dim(self) -> int | None:
        """The projected length k of one example (k_out * k_in for a kronecker `16x16`)."""
        if not self.projection:
            return None
        return math.prod(int(factor) for factor in str(self.projection["dim"]).split("x"))

    @property
    def precondition(self) -> str:
        """The scoring's preconditioner (`gram`, `kfac`), or `none`."""
        return (self.summary.get("preconditioner") or {}).get("kind", "none")

    @property
    def damping(self) -> float | None:
        return (self.summary.get("preconditioner") or {}).get("damping")

    @property
    def preconditioning(self) -> str:
        return preconditioning_text(self.precondition, self.damping)

    @property
    def label(self) -> str:
        """Short name: `full` or `<type>_<dim>` (a kronecker one as written: `kronecker_16x16`),
        then its preconditioning."""
        variant = "full" if self.dim is None else f"{self.projection_type}_{self.projection['dim']}"
        return variant + self.preconditioning


def scoring_label(
    manifest: dict, modules: int | None, precondition: str = "none", damping: float | None = None
) -> str:
    """What scores of the train run of `manifest` are, in every table, figure and page:
    `<target> <full | type_dim>`, the count of linear modules of a params run, then the
    preconditioning (`params kronecker_16x16, 210 modules · gram`)."""
    preconditioning = preconditioning_text(precondition, damping)
    if manifest.get("kind") == "peer":  # another tool's scores, adapted by bench/peers
        return str(manifest.get("label") or manifest.get("target") or "peer")
    if manifest.get("kind") == "hidden":
        return "hidden state (mean)" + preconditioning
    target = manifest.get("target") or "embeddings"
    projection = manifest.get("projection")
    variant = "full" if not projection else f"{projection['type']}_{projection['dim']}"
    count = f", {modules} modules" if modules and target == "params" else ""
    return f"{target} {variant}{count}{preconditioning}"


def preconditioning_text(precondition: str, damping: float | None) -> str:
    """What a label adds for a preconditioned scoring: ` · gram`, with the damping when it is
    not the default, so that scorings that differ in either never share a label."""
    if precondition == "none":
        return ""
    shown = "" if damping == DEFAULT_DAMPING else f" damping {damping:g}"
    return f" · {precondition}{shown}"


def read_summary(path: str | Path) -> dict:
    """summary.json of the score directory `path`, after checking its format version."""
    path = Path(path)
    summary_path = path / SUMMARY_FILE
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{summary_path} is not valid JSON ({err})") from err
    _check_format(path, SUMMARY_FILE, summary)
    return summary


def read_topk(path: str | Path) -> list[dict]:
    """topk.jsonl of the score directory `path`: one record per test example, in test order."""
    path = Path(path)
    for required in (SUMMARY_FILE, TOPK_FILE):
        if not (path / required).is_file():
            raise UserError(f"{path} has no {required}; pass a directory written by gradproj score")
    read_summary(path)  # checks the format version
    topk_path = path / TOPK_FILE
    try:
        return [json.loads(line) for line in topk_path.read_text().splitlines() if line]
    except json.JSONDecodeError as err:
        raise UserError(f"{topk_path} is not valid JSON lines ({err}); rescore it") from None


def load_score_dir(path: str | Path) -> ScoreDir:
    """Read scores.safetensors and summary.json; refuse missing files, an unknown format version
    and non-finite scores."""
    path = Path(path)
    scores_path = path / SCORES_FILE
    for required in (scores_path, path / SUMMARY_FILE):
        if not required.is_file():
            raise UserError(
                f"{path} is not a score directory (no {required.name}); "
                "pass a directory written by gradproj score (score_influence.py)"
            )
    summary = read_summary(path)
    with safe_open(str(scores_path), framework="np") as f:
        metadata = fsio.read_metadata(f)
        _check_format(path, SCORES_FILE, metadata)
        scores = {name: f.get_tensor(name) for name in FUNCTIONS if name in f.keys()}  # noqa: SIM118
    if not scores:
        raise UserError(f"{scores_path} holds neither 'dot' nor 'cosine' scores")
    train_ids = _json_list(metadata, "train_ids", scores_path)
    test_ids = _json_list(metadata, "test_ids", scores_path)
    score_dir = ScoreDir(path, scores, train_ids, test_ids, summary, metadata)
    for name, matrix in scores.items():
        _check_scores(score_dir, name, matrix)
    return score_dir


def _check_format(path: Path, file: str, info: dict) -> None:
    found = info.get("format") if isinstance(info, dict) else None
    if found != SCORES_FORMAT:
        written = "no score format" if found is None else f"score format {found!r}"
        raise UserError(
            f"{path}: {file} was written in {written}, which this gradproj (version "
            f"{__version__}) cannot read; rescore with this version or upgrade gradproj"
        )


def _check_scores(score_dir: ScoreDir, name: str, matrix: np.ndarray) -> None:
    expected = (len(score_dir.test_ids), len(score_dir.train_ids))
    if matrix.shape != expected:
        raise UserError(
            f"{score_dir.path}: '{name}' has shape {matrix.shape}, "
            f"but the ids give {expected}; the score file is corrupt"
        )
    bad = np.argwhere(~np.isfinite(matrix))
    if bad.size:
        test_i, train_j = bad[0]
        raise UserError(
            f"{score_dir.path}: '{name}' score of test example '{score_dir.test_ids[test_i]}' "
            f"and train example '{score_dir.train_ids[train_j]}' is {matrix[test_i, train_j]} "
            f"({len(bad)} non-finite scores); an all-zero gradient is the usual cause, "
            "exclude it when scoring"
        )


def _json_list(metadata: dict, key: str, path: Path) -> list[str]:
    if key not in metadata:
        raise UserError(f"{path} has no '{key}' metadata; rescore with gradproj score")
    return [str(x) for x in metadata[key]]
