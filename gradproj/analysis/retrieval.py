"""Source retrieval: how often a test example's known source is ranked first or in the top k.

A sanity check that explanations point somewhere sensible, for data whose test examples are
paraphrases of (or answered by) a known train example, such as the bundled example data.
"""

import numpy as np

from gradproj.analysis.scores import ScoreDir


def source_ranks(score_dir: ScoreDir, function: str, source_of: dict[str, str]) -> np.ndarray:
    """1-based rank of each test example's source among the train examples, by score.

    Ties count against the source (a tied competitor ranks ahead), so a constant score never
    looks like a hit. Test examples whose source is absent from the scores are left out.
    """
    scores = score_dir.scores[function]
    column = {train_id: j for j, train_id in enumerate(score_dir.train_ids)}
    ranks = []
    for i, test_id in enumerate(score_dir.test_ids):
        j = column.get(source_of.get(test_id))
        if j is not None:
            ranks.append(int(np.sum(scores[i] >= scores[i, j])))
    return np.asarray(ranks, dtype=int)


def hit_rates(ranks: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    return {f"top{k}": float(np.mean(ranks <= k)) if len(ranks) else float("nan") for k in ks}
