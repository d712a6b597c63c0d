"""Ranking agreement between two score matrices, one row per test example.

Every function takes `reference` and `candidate` as float arrays `[n_test, n_train]` (higher score
= more influential) and returns one value per test example (`[n_test]`). Rankings always come from
the scores themselves, never from the order in which train examples are stored.

Rank convention used throughout: `descending_ranks` gives the 0-based position of each train
example when the row is sorted by score from highest to lowest, tied scores sharing the average of
the positions they occupy (so a row of identical scores gives every item rank (n - 1) / 2).
"""

import numpy as np
from scipy.stats import rankdata

TOP_KS = (10, 50, 100)

# Bound on the elements of one [rows, chunk, n_train] pairwise block (keeps memory ~ 100 MB).
PAIR_BLOCK_ELEMENTS = 4_000_000


def descending_ranks(scores: np.ndarray) -> np.ndarray:
    """0-based ranks from the highest score down, ties averaged, per row."""
    return scores.shape[1] - rankdata(scores, method="average", axis=1)


def descending_order(scores: np.ndarray) -> np.ndarray:
    """Train indices from highest to lowest score per row; ties keep train order (stable)."""
    return np.argsort(-scores, axis=1, kind="stable")


def kendall_tau_b(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Kendall's tau-b per row: (C - D) / sqrt((P - T_ref) (P - T_cand)).

    C, D: concordant and discordant pairs; P: all pairs; T_x: pairs tied in x. Computed from the
    pairwise sign matrices in blocks, O(n_train^2) per row; NaN where one row is constant.
    """
    reference, candidate = _as_float_pair(reference, candidate)
    n_rows, n = reference.shape
    concordance = np.zeros(n_rows)
    untied_ref = np.zeros(n_rows)
    untied_cand = np.zeros(n_rows)
    chunk = max(1, PAIR_BLOCK_ELEMENTS // max(1, n_rows * n))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        sign_ref = np.sign(reference[:, start:stop, None] - reference[:, None, :])
        sign_cand = np.sign(candidate[:, start:stop, None] - candidate[:, None, :])
        # Each unordered pair appears twice (i, j) and (j, i); the factor cancels in the ratio.
        concordance += np.einsum("rij,rij->r", sign_ref, sign_cand)
        untied_ref += np.abs(sign_ref).sum(axis=(1, 2))
        untied_cand += np.abs(sign_cand).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return concordance / np.sqrt(untied_ref * untied_cand)


def spearman_rho(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Spearman's rho per row: Pearson correlation of the average ranks (ties averaged)."""
    reference, candidate = _as_float_pair(reference, candidate)
    return _row_pearson(descending_ranks(reference), descending_ranks(candidate))


def top_k_overlap(reference: np.ndarray, candidate: np.ndarray, k: int) -> np.ndarray:
    """|top_k(reference) ∩ top_k(candidate)| / k per row.

    top_k = the k highest-scoring train examples, ties at the boundary broken by train order.
    """
    reference, candidate = _as_float_pair(reference, candidate)
    k = _check_k(k, reference.shape[1])
    top_ref = descending_order(reference)[:, :k]
    top_cand = descending_order(candidate)[:, :k]
    in_ref = np.zeros(reference.shape, dtype=bool)
    np.put_along_axis(in_ref, top_ref, True, axis=1)
    return np.take_along_axis(in_ref, top_cand, axis=1).sum(axis=1) / k


def ndcg_at_k(reference: np.ndarray, candidate: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k with the reference ranks as graded relevance.

    rel(j) = n - r_ref(j), r_ref = 0-based descending reference rank with ties averaged (the best
    train example has relevance n, the worst 1). With train examples ordered by candidate score
    (ties by train order), DCG@k = sum_{p=1..k} rel(item at p) / log2(p + 1); NDCG@k = DCG@k /
    IDCG@k, IDCG@k being the DCG@k of the reference's own order. 1 when the candidate's top k are
    the reference's top k in the same order.
    """
    reference, candidate = _as_float_pair(reference, candidate)
    k = _check_k(k, reference.shape[1])
    relevance = reference.shape[1] - descending_ranks(reference)
    return _ndcg(relevance, candidate, k)


def ndcg_original(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """The original study's NDCG: relevance 1 / (r_ref + 1) over the full list.

    r_ref = 0-based descending reference rank (ties averaged), so the reference's best train
    example has relevance 1, the second 1/2, ...; DCG over all n positions with the log2(p + 1)
    discount, normalised by the ideal DCG. Dominated by the first few positions.
    """
    reference, candidate = _as_float_pair(reference, candidate)
    relevance = 1.0 / (descending_ranks(reference) + 1.0)
    return _ndcg(relevance, candidate, reference.shape[1])


def agreement_metrics(
    reference: np.ndarray, candidate: np.ndarray, top_ks=TOP_KS
) -> dict[str, np.ndarray]:
    """Every agreement metric per test example, keyed by its name in metrics.csv."""
    out = {
        "kendall_tau": kendall_tau_b(reference, candidate),
        "spearman_rho": spearman_rho(reference, candidate),
    }
    n_train = reference.shape[1]
    for k in top_ks:
        if k <= n_train:
            out[f"top{k}_overlap"] = top_k_overlap(reference, candidate, k)
            out[f"ndcg@{k}"] = ndcg_at_k(reference, candidate, k)
    out["ndcg_original"] = ndcg_original(reference, candidate)
    return out


def _ndcg(relevance: np.ndarray, candidate: np.ndarray, k: int) -> np.ndarray:
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    gained = np.take_along_axis(relevance, descending_order(candidate)[:, :k], axis=1)
    ideal = -np.sort(-relevance, axis=1)[:, :k]
    return (gained @ discount) / (ideal @ discount)


def _row_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(axis=1) / np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))


def _as_float_pair(reference, candidate) -> tuple[np.ndarray, np.ndarray]:
    reference = np.atleast_2d(np.asarray(reference, dtype=np.float64))
    candidate = np.atleast_2d(np.asarray(candidate, dtype=np.float64))
    if reference.shape != candidate.shape:
        raise ValueError(f"shape mismatch: {reference.shape} vs {candidate.shape}")
    return reference, candidate


def _check_k(k: int, n: int) -> int:
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside 1..{n}")
    return k
