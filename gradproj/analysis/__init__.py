"""Ranking agreement between score directories, JL theory, and the original pipeline's emulation.

Submodules: `metrics` (Kendall, Spearman, top-k overlap, NDCG), `stats` (bootstrap CIs,
permutation tests), `theory` (JL predictions), `original` (the original study's pipeline step by
step), `original_json` (the original's published JSON lists), `scores` (aligning score
directories), `runs` (full-gradient runs), `compare` (the compare_projections command), `report`
and `figures` (its outputs).
"""

from gradproj.analysis.compare import (
    CompareConfig,
    Comparison,
    compare_projections,
    compute_metrics,
    score_dispersion,
)
from gradproj.analysis.metrics import (
    agreement_metrics,
    kendall_tau_b,
    ndcg_at_k,
    ndcg_original,
    spearman_rho,
    top_k_overlap,
)
from gradproj.analysis.original import (
    OriginalSteps,
    ablation_variants,
    explain_scores,
    file_order_ranks,
    original_file_order,
    project_like_original,
    rank_kendall,
    run_ablation,
)
from gradproj.analysis.scores import align_to
from gradproj.analysis.stats import bootstrap_median_ci, median_difference_permutation_test
from gradproj.analysis.theory import (
    jl_cosine_std,
    jl_dot_std,
    norm_products_from_scores,
    predicted_kendall,
)
from gradproj.scoredir import ScoreDir, load_score_dir  # re-exported: notebooks and docs use them

__all__ = [
    "CompareConfig",
    "Comparison",
    "OriginalSteps",
    "ScoreDir",
    "ablation_variants",
    "agreement_metrics",
    "align_to",
    "bootstrap_median_ci",
    "compare_projections",
    "compute_metrics",
    "file_order_ranks",
    "jl_cosine_std",
    "jl_dot_std",
    "kendall_tau_b",
    "load_score_dir",
    "median_difference_permutation_test",
    "ndcg_at_k",
    "ndcg_original",
    "norm_products_from_scores",
    "explain_scores",
    "original_file_order",
    "predicted_kendall",
    "project_like_original",
    "rank_kendall",
    "run_ablation",
    "score_dispersion",
    "spearman_rho",
    "top_k_overlap",
]
