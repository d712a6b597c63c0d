"""The linear datamodeling score (LDS; Park et al. 2023, TRAK): does a ranking predict what
training on a subset does to a test example's loss?

Given a ground truth from `gradproj retrain` (M subsets of the train examples, each test
example's loss after fine-tuning on each), a method's attribution scores predict, for test
example j and subset S, the sum of the scores of S's train examples. Its LDS for j is the
Spearman correlation across the M subsets between that prediction and minus the loss; the table
gives the mean over test examples with a percentile bootstrap 95% CI over test examples. Methods:
every score directory given (each score function) and the baselines BM25 and a seeded random
ranking (hidden-state cosine comes from a `--target hidden` score directory).
"""

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from gradproj.analysis.retrieval import (
    bm25_scores,
    dataset_rows,
    method_label,
    random_scores,
)
from gradproj.analysis.stats import bootstrap_ci
from gradproj.errors import UserError
from gradproj.retrain import GroundTruth
from gradproj.scoredir import FUNCTIONS, ScoreDir


def per_test_lds(masks: np.ndarray, losses: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """`[n_test]` Spearman correlation, across subsets, of each test example's predicted effect
    (the summed scores of the subset's train examples) with minus its loss.

    masks: bool `[M, n_train]`; losses: `[M, n_test]`; scores: `[n_test, n_train]`, in the
    ground truth's order. NaN for a test example whose prediction or loss is constant across
    the subsets (the correlation is undefined)."""
    predicted = np.asarray(masks, dtype=np.float64) @ np.asarray(scores, dtype=np.float64).T
    return column_spearman(predicted, -np.asarray(losses, dtype=np.float64))


def column_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho of each column of a with the same column of b (average ranks for ties)."""
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    norms = np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (ra * rb).sum(axis=0) / norms, np.nan)


def lds_statistics(per_test: np.ndarray, n_bootstrap: int = 2000, seed: int = 0) -> dict:
    """n_test (test examples with a defined correlation), their mean LDS and its 95% CI."""
    finite = per_test[np.isfinite(per_test)]
    low, high = bootstrap_ci(finite, np.mean, n_bootstrap, seed=seed)
    value = float(np.mean(finite)) if finite.size else float("nan")
    return {"n_test": int(finite.size), "lds": value, "lds_ci_low": low, "lds_ci_high": high}


def aligned_scores(truth: GroundTruth, score_dir: ScoreDir, function: str) -> np.ndarray:
    """The score directory's matrix in the ground truth's test and train order; an error naming
    the first id that one holds and the other does not."""
    positions = []
    for side in ("train", "test"):
        ours, theirs = getattr(truth, f"{side}_ids"), getattr(score_dir, f"{side}_ids")
        if set(ours) != set(theirs):
            first = next(
                (f"{i!r} (only in the ground truth)" for i in ours if i not in set(theirs)), None
            ) or next(f"{i!r} (only in the scores)" for i in theirs if i not in set(ours))
            raise UserError(
                f"{truth.path} and {score_dir.path} hold different {side} examples, first "
                f"{first}; retrain or rescore on the same {side} examples"
            )
        where = {example_id: i for i, example_id in enumerate(theirs)}
        positions.append(np.array([where[i] for i in ours], dtype=np.int64))
    train_pos, test_pos = positions
    return score_dir.scores[function][np.ix_(test_pos, train_pos)]


def check_ids(truth: GroundTruth, score_dirs: list[ScoreDir]) -> None:
    """Every score directory holds the ground truth's examples (before any computation)."""
    for score_dir in score_dirs:
        aligned_scores(truth, score_dir, next(iter(score_dir.scores)))


def lds_table(
    truth: GroundTruth,
    score_dirs: list[ScoreDir],
    n_bootstrap: int = 2000,
    seed: int = 0,
    rows: tuple[dict, dict] | None = None,
) -> pd.DataFrame:
    """lds.csv: one row per score directory and function, then BM25 and random; besides the
    LDS columns, `target`, `projection` (type, or full) and `dim` (a projected vector's length,
    empty when not projected).

    `rows` = (train rows, test rows) by id for BM25; default: the datasets named in the first
    directory's run manifests."""
    check_ids(truth, score_dirs)
    table = []
    for score_dir in score_dirs:
        for function in (f for f in FUNCTIONS if f in score_dir.scores):
            values = per_test_lds(
                truth.masks, truth.losses, aligned_scores(truth, score_dir, function)
            )
            table.append(
                {"method": method_label(score_dir), "function": function}
                | lds_statistics(values, n_bootstrap, seed)
                | {"target": target_of(score_dir), "projection": score_dir.projection_type}
                | {"dim": total_dim(score_dir)}
            )
    for name, scores in baseline_scores(truth, score_dirs[0], seed, rows).items():
        values = per_test_lds(truth.masks, truth.losses, scores)
        table.append(
            {"method": name, "function": name}
            | lds_statistics(values, n_bootstrap, seed)
            | {"target": name, "projection": None, "dim": None}
        )
    return pd.DataFrame(table)


def target_of(score_dir: ScoreDir) -> str:
    if score_dir.manifest.get("kind") == "hidden":
        return "hidden"
    return score_dir.manifest.get("target") or "embeddings"


def total_dim(score_dir: ScoreDir) -> int | None:
    """The length of one projected vector (all layers of a per-layer projection); None when
    not projected."""
    projection = score_dir.projection
    if not projection:
        return None
    return int(projection.get("total_dim") or projection["dim"])


def baseline_scores(
    truth: GroundTruth, first: ScoreDir, seed: int, rows: tuple[dict, dict] | None
) -> dict[str, np.ndarray]:
    """BM25 and random scores `[n_test, n_train]` in the ground truth's order."""
    from gradproj.data import conversation_text  # imports `datasets`, as read_rows does

    train_rows, test_rows = rows or dataset_rows(first)
    return {
        "bm25": bm25_scores(
            [conversation_text(train_rows[i]) for i in truth.train_ids],
            [conversation_text(test_rows[i]) for i in truth.test_ids],
        ),
        "random": random_scores(len(truth.test_ids), len(truth.train_ids), seed),
    }
