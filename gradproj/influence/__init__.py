"""Influence scores: every train example against every test example, by dot product and cosine.

`gradproj.influence.config` holds the options, `gradproj.influence.memory` the block sizes,
`gradproj.influence.kernel` the arithmetic (its docstring says how each score is computed),
`gradproj.influence.provenance` what a scoring depends on and records,
`gradproj.influence.mapped` the original study's JSON, and `gradproj.influence.scoring` the one
computation (`compute_scores`) and the command (`score_influence`).
"""

from gradproj.influence.config import (
    FUNC_CHOICES,
    FUNCTIONS,
    PRECONDITIONERS,
    ScoreConfig,
    ScoringOptions,
    curvature_option,
    damping_option,
)
from gradproj.influence.kernel import Scorer, Scores, Scoring, ranked, topk_positions
from gradproj.influence.memory import available_host_bytes
from gradproj.influence.provenance import check_compatible, open_run, scoring_identity
from gradproj.influence.scoring import compute_scores, score_influence, warn_excluded

__all__ = [
    "FUNCTIONS", "FUNC_CHOICES", "PRECONDITIONERS", "ScoreConfig", "Scorer", "Scores", "Scoring",
    "ScoringOptions", "available_host_bytes", "check_compatible", "compute_scores",
    "curvature_option", "damping_option", "open_run", "ranked",
    "score_influence", "scoring_identity", "topk_positions", "warn_excluded",
]  # fmt: skip
