"""Aligning score directories by example ids (reading them is `gradproj.scoredir`'s)."""

import numpy as np

from gradproj.errors import UserError
from gradproj.scoredir import ScoreDir

# What reference and candidates must share, per run, as summary.json records it: the same
# examples of the same model. The projection (and so the run's kind) differs by design.
PROVENANCE = (
    "model", "checkpoint", "checkpoint_nr", "target", "dataset", "split", "mode",
    "max_seq_length", "n_examples", "examples_sha256",
)  # fmt: skip


def check_provenance(reference: ScoreDir, candidate: ScoreDir) -> None:
    """Refuse a candidate scored from other runs than the reference's (other data, model,
    checkpoint or examples), naming each difference; ids alone can coincide. A field that
    either summary lacks (written before it was recorded) is not compared."""
    differences = []
    for role in ("train_manifest", "test_manifest"):
        ref, cand = reference.summary.get(role) or {}, candidate.summary.get(role) or {}
        for key in PROVENANCE:
            if key in ref and key in cand and ref[key] != cand[key]:
                differences.append(f"{role.split('_')[0]} {key} ({ref[key]!r} vs {cand[key]!r})")
    if differences:
        raise UserError(
            f"{candidate.path} was scored from other runs than the reference {reference.path}: "
            f"{'; '.join(differences)}; compare scorings of the same train and test examples"
        )


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
