"""Reading score directories written by score_influence.py and aligning them by example ids."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open

from gradproj import store
from gradproj.errors import UserError

SCORES_FILE = "scores.safetensors"
SUMMARY_FILE = "summary.json"
FUNCTIONS = ("dot", "cosine")


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
        return int(self.projection["dim"]) if self.projection else None

    @property
    def label(self) -> str:
        """Short name: `full` or `<type>_<dim>`."""
        return "full" if self.dim is None else f"{self.projection_type}_{self.dim}"


def load_score_dir(path: str | Path) -> ScoreDir:
    """Read scores.safetensors and summary.json; refuse missing files and non-finite scores."""
    path = Path(path)
    scores_path, summary_path = path / SCORES_FILE, path / SUMMARY_FILE
    for required in (scores_path, summary_path):
        if not required.is_file():
            raise UserError(
                f"{path} is not a score directory (no {required.name}); "
                "pass a directory written by score_influence.py"
            )
    summary = _read_json(summary_path)
    with safe_open(str(scores_path), framework="np") as f:
        metadata = store.read_metadata(f)
        scores = {name: f.get_tensor(name) for name in FUNCTIONS if name in f.keys()}  # noqa: SIM118
    if not scores:
        raise UserError(f"{scores_path} holds neither 'dot' nor 'cosine' scores")
    train_ids = _json_list(metadata, "train_ids", scores_path)
    test_ids = _json_list(metadata, "test_ids", scores_path)
    score_dir = ScoreDir(path, scores, train_ids, test_ids, summary, metadata)
    for name, matrix in scores.items():
        _check_scores(score_dir, name, matrix)
    return score_dir


def align_to(reference: ScoreDir, candidate: ScoreDir) -> ScoreDir:
    """The candidate's scores reordered to the reference's train and test id order.

    Refuses when the id sets differ: agreement between rankings of different sets is meaningless.
    """
    for axis in ("train_ids", "test_ids"):
        ref_ids, cand_ids = getattr(reference, axis), getattr(candidate, axis)
        if set(ref_ids) != set(cand_ids):
            only_ref = sorted(set(ref_ids) - set(cand_ids))[:3]
            only_cand = sorted(set(cand_ids) - set(ref_ids))[:3]
            raise UserError(
                f"{candidate.path} and {reference.path} hold different {axis} "
                f"(only in reference: {only_ref}, only in candidate: {only_cand}); "
                "score both against the same train and test runs"
            )
    train_pos = _positions(candidate.train_ids, reference.train_ids)
    test_pos = _positions(candidate.test_ids, reference.test_ids)
    scores = {k: v[np.ix_(test_pos, train_pos)] for k, v in candidate.scores.items()}
    return ScoreDir(
        candidate.path,
        scores,
        list(reference.train_ids),
        list(reference.test_ids),
        candidate.summary,
        candidate.metadata,
    )


def _positions(ids: list[str], order: list[str]) -> np.ndarray:
    where = {example_id: i for i, example_id in enumerate(ids)}
    return np.array([where[example_id] for example_id in order], dtype=np.int64)


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
        raise UserError(f"{path} has no '{key}' metadata; rescore with score_influence.py")
    return [str(x) for x in metadata[key]]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from err
