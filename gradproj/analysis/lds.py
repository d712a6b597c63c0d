"""The linear datamodeling score (LDS; Park et al. 2023, TRAK): does a ranking predict what
training on a subset does to a test example's loss?

Given a ground truth from `gradproj retrain` (M subsets of the train examples, each test
example's loss after fine-tuning on each), a method's attribution scores predict, for test
example j and subset S, the sum of the scores of S's train examples. Its LDS for j is the
Spearman correlation across the M subsets between that prediction and minus the loss; the table
gives the mean over test examples with a percentile bootstrap 95% CI over test examples, and the
same mean on each half of the subsets (does the order of the methods hold on both?). Methods:
every score directory given (each score function) and the baselines BM25 and a seeded random
ranking (hidden-state cosine comes from a `--target hidden` score directory).

`lds_pairs` compares the best method with every other on the same test examples: the mean of
the per-test differences with a paired bootstrap 95% CI, and how often the best one wins.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from gradproj.analysis.retrieval import (
    bm25_scores,
    dataset_rows,
    method_label,
    random_scores,
    train_run_manifest,
)
from gradproj.analysis.stats import bootstrap_ci
from gradproj.errors import UserError
from gradproj.scoredir import FUNCTIONS, ScoreDir
from gradproj.truth import GroundTruth


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


def subset_halves(n_subsets: int) -> tuple[slice, slice]:
    """The first and the second half of the subsets: two disjoint ground truths."""
    return slice(0, n_subsets // 2), slice(n_subsets // 2, n_subsets)


def half_means(truth: GroundTruth, scores: np.ndarray) -> dict:
    """Mean LDS on each half of the subsets (NaN where a half has fewer than 2 subsets)."""
    means = {}
    for name, half in zip(("lds_half1", "lds_half2"), subset_halves(len(truth.masks)), strict=True):
        values = per_test_lds(truth.masks[half], truth.losses[half], scores)
        finite = values[np.isfinite(values)]
        means[name] = float(np.mean(finite)) if finite.size else float("nan")
    return means


# --- Checks of a ground truth against the scores it judges (before any computation) ---


def check_truth(truth: GroundTruth, score_dirs: list[ScoreDir]) -> None:
    """Refuse a ground truth that cannot judge these scores: another model, checkpoint, length
    or paradigm than their runs', duplicate ids, too few distinct subsets, non-finite losses."""
    for side in ("train", "test"):
        ids = getattr(truth, f"{side}_ids")
        if len(set(ids)) != len(ids):
            first = next(i for k, i in enumerate(ids) if i in ids[:k])
            raise UserError(
                f"{truth.path} lists {side} example {first!r} twice; rewrite it with "
                "gradproj retrain on data with unique ids"
            )
    distinct = {mask.tobytes() for mask in truth.masks}
    if len(truth.masks) < 2 or len(distinct) < 2:
        raise UserError(
            f"{truth.path} has {len(distinct)} distinct subset(s) of {len(truth.masks)}: LDS "
            "correlates across subsets; rewrite it with more --n_subsets or another --fraction"
        )
    bad = np.argwhere(~np.isfinite(truth.losses))
    if bad.size:
        subset, j = bad[0]
        raise UserError(
            f"{truth.path}: test example {truth.test_ids[j]!r} has loss "
            f"{truth.losses[subset, j]} after subset {subset} ({len(bad)} non-finite losses); "
            "rewrite the ground truth with gradproj retrain (a smaller --lr)"
        )
    for score_dir in score_dirs:
        check_same_model(truth, score_dir)


def check_same_model(truth: GroundTruth, score_dir: ScoreDir) -> None:
    """The ground truth's checkpoint, max_seq_length and paradigm are the scored runs'."""
    settings = truth.info.get("settings") or {}
    manifest = score_dir.manifest
    run_manifest = train_run_manifest(score_dir)  # None: the run moved, its paradigm unknown
    options = (run_manifest.options if run_manifest else None) or {}
    pairs = {
        "checkpoint": (truth.info.get("checkpoint"), manifest.get("checkpoint")),
        "max_seq_length": (settings.get("max_seq_length"), manifest.get("max_seq_length")),
        "paradigm": (settings.get("paradigm"), options.get("paradigm")),
    }
    differences = [
        f"{name} {ours!r} vs {theirs!r}"
        for name, (ours, theirs) in pairs.items()
        if ours is not None and theirs is not None and ours != theirs
    ]
    if differences:
        raise UserError(
            f"{truth.path} was retrained on another model or setting than {score_dir.path} "
            f"was scored with ({'; '.join(differences)}); retrain with the runs' model and options"
        )


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


# --- The tables ---


@dataclass
class Method:
    """One row of lds.csv: what it is, and its scores in the ground truth's order."""

    method: str
    function: str
    target: str
    projection: str | None
    dim: int | None
    precondition: str
    damping: float | None
    scores: np.ndarray


def methods_of(score_dir: ScoreDir, truth: GroundTruth) -> list[Method]:
    return [
        Method(
            method_label(score_dir),
            function,
            target_of(score_dir),
            score_dir.projection_type,
            total_dim(score_dir),
            score_dir.precondition,
            score_dir.damping,
            aligned_scores(truth, score_dir, function),
        )  # fmt: skip
        for function in FUNCTIONS
        if function in score_dir.scores
    ]


def lds_methods(
    truth: GroundTruth, score_dirs: list[ScoreDir], seed: int = 0, rows=None
) -> list[Method]:
    """Every score directory's functions, then BM25 and random; the checks come first."""
    check_truth(truth, score_dirs)
    check_ids(truth, score_dirs)
    methods = [m for score_dir in score_dirs for m in methods_of(score_dir, truth)]
    for name, scores in baseline_scores(truth, score_dirs[0], seed, rows).items():
        methods.append(Method(name, name, name, None, None, "none", None, scores))
    return methods


def lds_table(
    truth: GroundTruth,
    score_dirs: list[ScoreDir],
    n_bootstrap: int = 2000,
    seed: int = 0,
    rows: tuple[dict, dict] | None = None,
) -> pd.DataFrame:
    """lds.csv: one row per score directory and function, then BM25 and random; besides the
    LDS columns, `target`, `projection` (type, or full), `dim` (a projected vector's length,
    empty when not projected), `precondition`, `damping` and the LDS on each half of the
    subsets.

    `rows` = (train rows, test rows) by id for BM25; default: the datasets named in the first
    directory's run manifests."""
    return tables_of(truth, lds_methods(truth, score_dirs, seed, rows), n_bootstrap, seed)[0]


def tables_of(
    truth: GroundTruth, methods: list[Method], n_bootstrap: int = 2000, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(lds.csv, lds_pairs.csv) of these methods and of the fused ranking (`fused_method`)."""
    methods = methods + fused_method(truth, methods)
    per_test = [per_test_lds(truth.masks, truth.losses, m.scores) for m in methods]
    table = pd.DataFrame(
        [
            {"method": m.method, "function": m.function}
            | lds_statistics(values, n_bootstrap, seed)
            | {"target": m.target, "projection": m.projection, "dim": m.dim}
            | {"precondition": m.precondition, "damping": m.damping}
            | half_means(truth, m.scores)
            for m, values in zip(methods, per_test, strict=True)
        ]
    )
    return table, lds_pairs(table, per_test, n_bootstrap, seed)


def fused_method(truth: GroundTruth, methods: list[Method]) -> list[Method]:
    """The preconditioned method of highest LDS fused with BM25: per test example, the sum of
    the two rankings' z-scored scores (none without a preconditioned method)."""
    whitened = [m for m in methods if m.precondition != "none"]
    bm25 = [m for m in methods if m.method == "bm25"]
    if not (whitened and bm25):
        return []

    def mean_lds(method: Method) -> float:
        values = per_test_lds(truth.masks, truth.losses, method.scores)
        return float(np.nanmean(values)) if np.isfinite(values).any() else -np.inf

    best = max(whitened, key=mean_lds)
    scores = row_zscores(best.scores) + row_zscores(bm25[0].scores)
    return [
        Method(f"{best.method} + bm25", best.function, "fused", None, None,
               best.precondition, best.damping, scores)
    ]  # fmt: skip


def row_zscores(scores: np.ndarray) -> np.ndarray:
    """Each test example's scores, centred and divided by their std (a constant row: zeros)."""
    scores = np.asarray(scores, dtype=np.float64)
    centred = scores - scores.mean(axis=1, keepdims=True)
    std = scores.std(axis=1, keepdims=True)
    return centred / np.where(std > 0, std, 1.0)


def lds_pairs(
    table: pd.DataFrame, per_test: list[np.ndarray], n_bootstrap: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """lds_pairs.csv: the method of highest LDS against every other, and so the best single
    ranking when that is the fused one, on the test examples where both are defined: the mean
    per-test difference (best minus other), its paired bootstrap 95% CI (test examples
    resampled, both methods together), and the wins of the best of n."""
    rows = []
    for best in leaders(table):
        for k, values in enumerate(per_test):
            if k != best:
                rows.append(
                    {"best": table.method[best], "best_function": table.function[best]}
                    | {"other": table.method[k], "other_function": table.function[k]}
                    | paired_difference(per_test[best], values, n_bootstrap, seed)
                )
    return pd.DataFrame(rows)


def leaders(table: pd.DataFrame) -> list[int]:
    """Rows of the highest LDS overall and of the highest single (not fused) ranking."""
    lds = table.lds.to_numpy(dtype=np.float64)
    best = int(np.nanargmax(lds))
    single = np.where(table.target.to_numpy() == "fused", np.nan, lds)
    return sorted({best, int(np.nanargmax(single))}, key=lambda k: -lds[k])


def paired_difference(best: np.ndarray, other: np.ndarray, n_bootstrap: int, seed: int) -> dict:
    both = np.isfinite(best) & np.isfinite(other)
    difference = best[both] - other[both]
    low, high = bootstrap_ci(difference, np.mean, n_bootstrap, seed=seed)
    return {
        "n_test": int(both.sum()),
        "difference": float(np.mean(difference)) if both.any() else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "wins": int((difference > 0).sum()),
    }


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
