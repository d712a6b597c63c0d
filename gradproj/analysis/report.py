"""Writing the comparison: CSV tables, PNG figures and report.md tying them together."""

import re
from pathlib import Path

import numpy as np
import pandas as pd

from gradproj.analysis import figures

HEADLINE_METRICS = ("kendall_tau", "spearman_rho", "top10_overlap", "ndcg@10", "ndcg_original")


def write_outputs(comparison, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    tables = {
        "metrics.csv": comparison.metrics,
        "summary.csv": comparison.summary,
        "permutation_tests.csv": comparison.permutation_tests,
        "theory.csv": comparison.theory,
        "theory_vs_measured.csv": comparison.theory_vs_measured,
        "dispersion.csv": comparison.dispersion,
    }
    if comparison.ablation is not None:
        tables["ablation.csv"] = comparison.ablation
    if comparison.retrieval is not None:
        tables["retrieval.csv"] = comparison.retrieval
    if comparison.lds is not None:
        tables["lds.csv"] = comparison.lds
        tables["lds_pairs.csv"] = comparison.lds_pairs
    for name, table in tables.items():
        table.to_csv(output / name, index=False)
    comparison.figures = write_figures(comparison, output)
    (output / "report.md").write_text(render_report(comparison))


def write_figures(comparison, output: Path) -> list[Path]:
    paths = []
    reference_metrics = set(comparison.metrics[comparison.metrics.comparison == "reference"].metric)
    for metric in [m for m in HEADLINE_METRICS if m in reference_metrics]:
        name = f"violin_{metric.replace('@', '_at_')}.png"
        paths.append(figures.violin_grid(comparison.metrics, metric, output / name))
    if reference_metrics:
        paths.append(
            figures.agreement_vs_dim(
                comparison.summary,
                comparison.theory,
                "kendall_tau",
                output / "agreement_vs_dim.png",
            )
        )
    if comparison.ablation is not None and len(comparison.ablation):
        paths.append(figures.original_curves(comparison.ablation, output / "original_curves.png"))
    if (comparison.metrics.comparison == "dot_vs_cosine").any():
        paths.append(figures.dot_cosine_histogram(comparison.metrics, output / "dot_vs_cosine.png"))
    if comparison.retrieval is not None:
        paths.append(figures.retrieval_intervals(comparison.retrieval, output / "retrieval.png"))
    if comparison.lds is not None:
        paths.append(figures.lds_figure(comparison.lds, output / "lds.png"))
    return paths


def render_report(comparison) -> str:
    ref = comparison.reference
    parts = [
        "# Projection vs reference: ranking agreement\n",
        f"Reference: `{ref.path}` ({ref.label}); {len(ref.test_ids)} test x "
        f"{len(ref.train_ids)} train examples. Candidates: "
        + ", ".join(f"`{c.label}`" for c in comparison.candidates)
        + ".\n",
        "Every metric is computed per test example from the scores (never from file order); "
        "tables give the median over test examples with a 95% bootstrap CI. Definitions: "
        "docs/analysis.md of gradproj.\n",
        *[f"- {note}" for note in comparison.notes],
        opening_summary(comparison),
        "\n## Agreement with the reference\n",
        "How closely each projection's ranking of the train examples follows the reference's, "
        "per score function and dim.\n",
        headline_table(comparison.summary),
        metric_definitions(comparison.summary),
        *figure_links(comparison.figures, "violin_"),
        *figure_links(comparison.figures, "agreement_vs_dim"),
        "\n## Consecutive dims: permutation test of the difference of medians\n",
        "Whether a larger dim agrees with the reference significantly better than the next "
        "smaller one.\n",
        "`median_difference`: median Kendall's tau at `dim_high` minus at `dim_low`; `p_value`: "
        "two-sided, the two dims' values pooled and reshuffled `n_permutations` times.\n",
        markdown_table(kendall_only(comparison.permutation_tests)),
        "\n## Johnson-Lindenstrauss prediction vs measurement (Kendall's tau)\n",
        "Whether the measured agreement is what a random projection's noise alone predicts; a "
        "shortfall points at a numerical problem.\n",
        "`predicted_median`: the median Kendall's tau expected from the noise of a dense "
        "projection at that dim alone (scores plus normal noise of the JL size, ranked again); "
        "`flagged`: the measured median lies more than the flag margin below it, its CI "
        "entirely below.\n",
        theory_section(comparison.theory_vs_measured),
        "\n## Dot vs cosine within one dimension\n",
        "Kendall's tau between the dot-product ranking and the cosine ranking of the same "
        "directory, per test example (the original study's dot-vs-cosine histogram).\n",
        markdown_table(dot_vs_cosine_table(comparison.summary)),
        *figure_links(comparison.figures, "dot_vs_cosine"),
        "\n## Score dispersion (mean over test examples of the std of train scores)\n",
        "How spread out each directory's scores are: a projection keeps the dot products' scale, "
        "and cosines stay within [-1, 1].\n",
        markdown_table(dispersion_table(comparison.dispersion)),
    ]
    if comparison.ablation is not None:
        parts += [
            "\n## Emulated original pipeline: ablation (median Kendall's tau)\n",
            "Which of the original study's steps, alone or together, lower the agreement of its "
            "projected rankings with its full-gradient ranking.\n",
            ABLATION_NOTE,
            markdown_table(ablation_pivot(comparison.ablation)),
            *figure_links(comparison.figures, "original_curves"),
            "\nMean over test examples of the std of the candidate's scores per variant (without "
            "the 1/sqrt(k) scaling, projected dot products grow with k):\n",
            markdown_table(ablation_pivot(comparison.ablation, "mean_std_of_scores")),
        ]
    if comparison.retrieval is not None:
        parts += [
            "\n## Retrieval of each test example's known source\n",
            "Which method ranks each test example's known source first: a ground truth, unlike "
            "agreement with the reference.\n",
            RETRIEVAL_NOTE,
            markdown_table(retrieval_cells(comparison.retrieval)),
            *figure_links(comparison.figures, "retrieval"),
        ]
    if comparison.lds is not None:
        parts += lds_section(comparison)
    return "\n".join(parts) + "\n"


LDS_NOTE = (
    "The linear datamodeling score (LDS; Park et al. 2023): the model was fine-tuned on random "
    "subsets of the train examples (`gradproj retrain`); per test example, the Spearman "
    "correlation across subsets between the summed scores of a subset's train examples and "
    "minus the test example's loss after training on it; the mean over test examples with a "
    "95% bootstrap CI over test examples. 1: the scores predict which subsets help each test "
    "example; 0: they do not. Methods and limits: docs/lds.md of gradproj.\n"
)


LDS_PAIRS_NOTE = (
    "The method of highest LDS (and the best single ranking, when the best is the fused one) "
    "against every other, on the same test examples: the mean of the "
    "per-test differences [paired bootstrap 95% CI] and the test examples on which it is the "
    "higher. It is *ahead* where the CI lies above 0, *behind* where it lies below, *level* where "
    "it holds 0.\n"
)


def lds_section(comparison) -> list[str]:
    parts = [
        "\n## Which ranking is influence: linear datamodeling score\n",
        LDS_NOTE,
        "Best first. `halves`: the LDS on the first and on the second half of the subsets, two "
        "disjoint ground truths: an order that holds on both is not a fluke of the subsets.\n",
        markdown_table(lds_cells(comparison.lds)),
        *figure_links(comparison.figures, "lds"),
    ]
    if comparison.lds_pairs is not None and len(comparison.lds_pairs):
        parts += [
            "\n### The best method against every other\n",
            LDS_PAIRS_NOTE,
            markdown_table(pair_cells(comparison.lds_pairs)),
        ]
    return parts


def lds_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The LDS table's cells, best first."""
    table = table.sort_values("lds", ascending=False, kind="stable")
    cells = table[["method", "function", "n_test"]].copy()
    cells["lds"] = [
        f"{r.lds:.3f} [{r.lds_ci_low:.3f}, {r.lds_ci_high:.3f}]" for r in table.itertuples()
    ]
    if {"lds_half1", "lds_half2"} <= set(table.columns):
        cells["halves"] = [f"{r.lds_half1:.3f} / {r.lds_half2:.3f}" for r in table.itertuples()]
    return cells


def pair_cells(pairs: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "best": [pair_method(r, "best") for r in pairs.itertuples()],
            "against": [pair_method(r, "other") for r in pairs.itertuples()],
            "difference": [
                f"{r.difference:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
                for r in pairs.itertuples()
            ],
            "wins": [f"{r.wins} of {r.n_test}" for r in pairs.itertuples()],
            "is": [standing(r) for r in pairs.itertuples()],
        }
    )


def standing(pair) -> str:
    """The report's word for a paired difference: `ahead of` or `behind` only when its CI
    excludes 0, `level with` otherwise."""
    if pair.ci_low > 0:
        return "ahead of"
    return "behind" if pair.ci_high < 0 else "level with"


def pair_method(pair, side: str) -> str:
    method, function = getattr(pair, side), getattr(pair, f"{side}_function")
    return method if method == function else f"{method} ({function})"


# --- The opening summary: one short line per finding, each written from the numbers ---


def opening_summary(comparison) -> str:
    """At most SUMMARY_LINES lines; each function of SUMMARY gives one, or None when its data is
    missing. A new finding is a new function appended to SUMMARY."""
    lines = [line for make in SUMMARY for line in [make(comparison)] if line]
    return "\n## Summary\n\n" + "".join(f"- {line}\n" for line in lines[:SUMMARY_LINES])


SUMMARY_LINES = 10


def agreement_summary(comparison) -> str | None:
    """Median Kendall's tau per function and dim, and the first dim reaching 0.9."""
    data = comparison.summary
    data = data[(data.comparison == "reference") & (data.metric == "kendall_tau")]
    if data.empty:
        return None
    parts = []
    for (function, proj_type), rows in data.groupby(["function", "projection_type"], sort=False):
        rows = rows.sort_values("dim")
        values = ", ".join(f"{r['median']:.2f} at {dim_text(r.dim)}" for _, r in rows.iterrows())
        high = rows[rows["median"] >= AGREEING]
        reached = f"; {AGREEING} first at {dim_text(high.dim.iloc[0])}" if len(high) else ""
        parts.append(f"{function} ({proj_type}) {values}{reached}")
    return "Agreement with the reference (median Kendall's tau): " + "; ".join(parts) + "."


AGREEING = 0.9  # a median Kendall's tau the summary calls close agreement


def theory_summary(comparison) -> str | None:
    table = comparison.theory_vs_measured
    if table.empty:
        return None
    flagged = table[table.flagged]
    if flagged.empty:
        return "Every projection agrees as well as the JL prediction says it should."
    names = ", ".join(f"{r.candidate} ({r.function})" for r in flagged.itertuples())
    return f"Far below the JL prediction, a likely numerical problem: {names}."


def artifact_summary(comparison) -> str | None:
    """Whether the emulated original pipeline lowers cosine agreement (the original's artifact)."""
    ablation = comparison.ablation
    if ablation is None or ablation.empty:
        return None
    pivot = ablation.pivot_table(
        index=["function", "projection_type", "dim"], columns="variant", values="kendall_median"
    )
    if not {"none", "exact_original"} <= set(pivot.columns):
        return None
    drop = pivot["none"] - pivot["exact_original"]
    function, proj_type, dim = drop.idxmax()
    none, exact = pivot.loc[(function, proj_type, dim), ["none", "exact_original"]]
    where = f"{function} at {proj_type} {dim_text(dim)} dims"
    if drop.max() <= ARTIFACT_DROP:
        return (
            f"The original's artifact is absent: its emulated pipeline agrees within "
            f"{ARTIFACT_DROP} of this project's everywhere (largest drop: {where})."
        )
    return (
        f"The original's artifact is present in its emulated pipeline: {where} falls from "
        f"{none:.2f} (this project) to {exact:.2f} (every step of the original); this "
        "project's own scores do not have it."
    )


ARTIFACT_DROP = 0.05  # a fall in median Kendall's tau larger than this is called an artifact


def retrieval_summary(comparison) -> str | None:
    """The method that most often ranks the source first (MRR breaks ties), and the reference."""
    table = comparison.retrieval
    if table is None or table.empty:
        return None
    best = table.sort_values(["top1", "mrr"], ascending=False, kind="stable").iloc[0]
    n = int(best.n_test)
    text = (
        f"Finds each test example's source best: {method_text(best)}, first for "
        f"{round(best.top1 * n)} of {n} (MRR {best.mrr:.2f})"
    )
    return text + reference_rows(table, best, lambda row: f"{round(row.top1 * n)} of {n}") + "."


def reference_rows(table: pd.DataFrame, best, value) -> str:
    """'; <method>: <value>' for each row of the reference directory (the table's first
    method) other than `best`."""
    reference = table[table.method == table.method.iloc[0]]
    return "".join(
        f"; {method_text(row)}: {value(row)}"
        for _, row in reference.iterrows()
        if (row.method, row.function) != (best.method, best.function)
    )


def method_text(row) -> str:
    return row.method if row.function == row.method else f"{row.method} ({row.function})"


def exclusions_summary(comparison) -> str:
    """The examples the reference's scoring left out, by reason; none is said too."""
    excluded = comparison.reference.summary.get("excluded") or {}
    parts = []
    for role in ("train", "test"):
        items = excluded.get(role) or []
        by_reason: dict[str, list[str]] = {}
        for item in items:
            by_reason.setdefault(item.get("reason", "skipped"), []).append(str(item["id"]))
        for reason, ids in by_reason.items():
            named = ", ".join(ids[:EXCLUDED_NAMED]) + (" ..." if len(ids) > EXCLUDED_NAMED else "")
            parts.append(f"{len(ids)} {role} example(s) for {reason} ({named})")
    if not parts:
        return "No example was excluded: every train and test example is scored."
    return "Excluded from every table: " + "; ".join(parts) + "."


EXCLUDED_NAMED = 6


def dim_text(dim) -> str:
    return "full" if not dim else f"{int(dim):,}"


def lds_summary(comparison) -> str | None:
    """The method whose scores best predict the retrained losses (LDS), with its preconditioner
    and damping; ahead of or level with the runner-up, BM25 and the reference, by the paired CI."""
    return leader_summary(comparison, 0, "Explains best (LDS, the retrained ground truth)")


def single_lds_summary(comparison) -> str | None:
    """The same for the best single ranking, when the best is the fused one."""
    return leader_summary(comparison, 1, "Best single ranking (not fused)")


def leader_summary(comparison, k: int, title: str) -> str | None:
    table, pairs = comparison.lds, comparison.lds_pairs
    if table is None or table.empty:
        return None
    if pairs is None or pairs.empty:
        best = table.sort_values("lds", ascending=False, kind="stable").iloc[0]
        return None if k else f"{title}: {lds_method_text(best)}, {lds_cell(best)}."
    leaders = list(dict.fromkeys(zip(pairs.best, pairs.best_function, strict=True)))
    if k >= len(leaders):
        return None
    method, function = leaders[k]
    best = table[(table.method == method) & (table.function == function)].iloc[0]
    own = pairs[(pairs.best == method) & (pairs.best_function == function)]
    named = "; ".join(pair_text(p) for p in summary_pairs(table, own))
    return f"{title}: {lds_method_text(best)}, {lds_cell(best)}; {named}."


def lds_cell(row) -> str:
    return f"{row.lds:.2f} [{row.lds_ci_low:.2f}, {row.lds_ci_high:.2f}]"


def lds_method_text(row) -> str:
    """`method (function)`, and the damping of a preconditioned one (`(cosine, damping 1)`)."""
    if row.function == row.method:
        return row.method
    damping = f", damping {row.damping:g}" if row.precondition != "none" else ""
    return f"{row.method} ({row.function}{damping})"


def summary_pairs(table: pd.DataFrame, pairs: pd.DataFrame) -> list:
    """The pairs the summary names, each method at its best function: the runner-up (another
    method than the best), BM25 and the reference directory's method."""
    ranked = pairs.merge(
        table[["method", "function", "lds", "target"]],
        left_on=["other", "other_function"],
        right_on=["method", "function"],
    ).sort_values("lds", ascending=False, kind="stable")
    others = ranked[ranked.other != ranked.best].drop_duplicates("other")
    reference = table.method.iloc[0]
    named = others.head(1).index.union(others[others.other.isin(["bm25", reference])].index)
    named = named.union(others[others.target == "fused"].index)
    return list(others.loc[[i for i in others.index if i in named]].itertuples())


def pair_text(pair) -> str:
    return (
        f"{standing(pair)} {pair_method(pair, 'other')} ({pair.lds:.2f}; difference "
        f"{pair.difference:+.3f} [{pair.ci_low:+.3f}, {pair.ci_high:+.3f}], "
        f"higher on {pair.wins} of {pair.n_test})"
    )


def halves_summary(comparison) -> str | None:
    """Whether the order of the first two methods (each at its best function), and of the best
    single ranking and BM25, holds on both halves of the subsets."""
    table = comparison.lds
    if table is None or "lds_half1" not in table.columns:
        return None
    best = table.sort_values("lds", ascending=False, kind="stable").drop_duplicates("method")
    if len(best) < 2:
        return None
    orders = [tuple(best.iloc[:2].itertuples())]
    single, bm25 = best[best.target != "fused"].iloc[:1], best[best.method == "bm25"]
    if (
        len(single)
        and len(bm25)
        and "bm25" not in {r.method for r in (*orders[0], *single.itertuples())}
    ):
        orders.append((single.iloc[0], bm25.iloc[0]))
    return "On each half of the subsets: " + "; ".join(half_order(*o) for o in orders) + "."


def half_order(first, second) -> str:
    holds = [a > b for a, b in zip(
        (first.lds_half1, first.lds_half2), (second.lds_half1, second.lds_half2), strict=True
    )]  # fmt: skip
    verdict = {2: "holds on both halves", 1: "holds on one half only", 0: "is reversed on both"}
    return (
        f"{method_text(first)} {first.lds_half1:.2f} / {first.lds_half2:.2f}, "
        f"{method_text(second)} {second.lds_half1:.2f} / {second.lds_half2:.2f}: their order "
        f"{verdict[sum(holds)]}"
    )


SUMMARY = [agreement_summary, theory_summary, artifact_summary, retrieval_summary, lds_summary,
           single_lds_summary, halves_summary, exclusions_summary]  # fmt: skip


RETRIEVAL_NOTE = (
    "Per method and score function: the share of test examples whose source train example is "
    "ranked first (top1) or in the first five (top5), and the mean reciprocal rank of the source "
    "(mrr), with 95% bootstrap CIs over test examples; ties keep train order, as in the lists of "
    "score_influence.py. `bm25`: BM25 over the conversations' words; `random`: a seeded random "
    "ranking. Cosine is the normalised inner product (LESS's choice for its projected "
    "gradients). Methods and limits: docs/retrieval.md of gradproj.\n"
)


def retrieval_cells(table: pd.DataFrame) -> pd.DataFrame:
    cells = table[["method", "function", "n_test"]].copy()
    for name in ("top1", "top5", "mrr"):
        cells[name] = [
            f"{r[name]:.2f} [{r[name + '_ci_low']:.2f}, {r[name + '_ci_high']:.2f}]"
            for _, r in table.iterrows()
        ]
    return cells


ABLATION_NOTE = (
    "Each step of the original pipeline is applied on the side where the original had it "
    "(docs/original_study.md): `none` is this project's pipeline, recomputed (it should match "
    "the measured agreement above); then each step alone; `nan_mechanism` the all-zero gradient, "
    "fp16 full scores and list.sort together; `exact_original` every step, as the original "
    "computed it; `exact_original_without_<step>` every step but one.\n"
)


def headline_table(summary: pd.DataFrame) -> str:
    data = summary[(summary.comparison == "reference") & summary.metric.isin(HEADLINE_METRICS)]
    if data.empty:
        return "_No candidate shares a score function with the reference._\n"
    data = data.assign(value=[ci_cell(r) for r in data.itertuples()])
    table = data.pivot_table(
        index=["function", "projection_type", "dim"],
        columns="metric",
        values="value",
        aggfunc="first",
        sort=False,
    ).reset_index()
    ordered = [m for m in HEADLINE_METRICS if m in table.columns]
    return markdown_table(table[["function", "projection_type", "dim", *ordered]])


METRIC_DEFINITIONS = {
    "kendall_tau": "Kendall's tau-b between the candidate's and the reference's scores of the "
    "train examples: 1 same order, 0 unrelated, -1 reversed",
    "spearman_rho": "Spearman's rho: the correlation of the two rankings (average ranks for ties)",
    "top{k}_overlap": "share of the reference's {k} highest-scored train examples that are also "
    "among the candidate's {k} highest",
    "ndcg@{k}": "NDCG over the candidate's first {k} train examples, each worth n minus its "
    "reference rank (the reference's best is worth n): 1 when they are the reference's first {k} "
    "in its order",
    "ndcg_original": "the original study's NDCG: relevance 1 / (reference rank + 1) over the "
    "whole list, so it weighs almost only the first few positions",
}


def metric_definitions(summary: pd.DataFrame) -> str:
    """One line per metric the headline table shows, with the table's cells explained."""
    shown = [m for m in HEADLINE_METRICS if m in set(summary.metric)]
    lines = [
        "Per test example, then the median over test examples [95% bootstrap CI]:\n",
        *(f"- `{m}`: {metric_definition(m)}." for m in shown),
    ]
    return "\n".join(lines) + "\n" if shown else ""


def metric_definition(metric: str) -> str:
    for pattern, text in METRIC_DEFINITIONS.items():
        match = re.fullmatch(re.escape(pattern).replace(r"\{k\}", r"(\d+)"), metric)
        if match:
            return text.format(k=match.group(1)) if match.groups() else text
    raise KeyError(f"no definition of the metric {metric!r}")


def ci_cell(row) -> str:
    return f"{row.median:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]"


def kendall_only(tests: pd.DataFrame) -> pd.DataFrame:
    return tests[tests.metric == "kendall_tau"] if len(tests) else tests


def theory_section(table: pd.DataFrame) -> str:
    if table.empty:
        return "_No prediction (needs a full reference and projected candidates)._\n"
    flagged = table[table.flagged]
    text = markdown_table(table)
    if len(flagged):
        names = ", ".join(f"{r.candidate} ({r.function})" for r in flagged.itertuples())
        text += (
            f"\n**Flagged:** measured agreement far below the JL prediction for {names}: "
            "a likely numerical problem (precision, scaling, NaN handling), not the "
            "projection itself.\n"
        )
    else:
        text += "\nNo candidate falls far below its prediction.\n"
    return text


def dot_vs_cosine_table(summary: pd.DataFrame) -> pd.DataFrame:
    data = summary[(summary.comparison == "dot_vs_cosine") & (summary.metric == "kendall_tau")]
    return data[["candidate", "n", "median", "ci_low", "ci_high"]]


def dispersion_table(dispersion: pd.DataFrame) -> pd.DataFrame:
    return dispersion.pivot_table(
        index=["candidate", "projection_type", "dim"],
        columns="function",
        values="mean_std_of_scores",
        sort=False,
    ).reset_index()


def ablation_pivot(ablation: pd.DataFrame, value: str = "kendall_median") -> pd.DataFrame:
    data = ablation.assign(
        column=[f"{r.function} {r.projection_type}_{r.dim}" for r in ablation.itertuples()]
    )
    return data.pivot_table(
        index="variant", columns="column", values=value, sort=False
    ).reset_index()


def figure_links(paths: list[Path], prefix: str) -> list[str]:
    return [f"\n![{p.stem}]({p.name})\n" for p in paths if p.name.startswith(prefix)]


def markdown_table(table: pd.DataFrame) -> str:
    if table is None or table.empty:
        return "_(empty)_\n"
    header = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in table.to_numpy()]
    return "\n".join([header, rule, *body]) + "\n"


def format_cell(value) -> str:
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            return "nan"
        return f"{value:.3g}" if abs(value) >= 1000 or (0 < abs(value) < 1e-3) else f"{value:.3f}"
    return str(value)
