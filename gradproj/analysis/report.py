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
        "\n## Agreement with the reference\n",
        headline_table(comparison.summary),
        metric_definitions(comparison.summary),
        *figure_links(comparison.figures, "violin_"),
        *figure_links(comparison.figures, "agreement_vs_dim"),
        "\n## Consecutive dims: permutation test of the difference of medians\n",
        "`median_difference`: median Kendall's tau at `dim_high` minus at `dim_low`; `p_value`: "
        "two-sided, the two dims' values pooled and reshuffled `n_permutations` times.\n",
        markdown_table(kendall_only(comparison.permutation_tests)),
        "\n## Johnson-Lindenstrauss prediction vs measurement (Kendall's tau)\n",
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
        markdown_table(dispersion_table(comparison.dispersion)),
    ]
    if comparison.ablation is not None:
        parts += [
            "\n## Emulated original pipeline: ablation (median Kendall's tau)\n",
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
            RETRIEVAL_NOTE,
            markdown_table(retrieval_cells(comparison.retrieval)),
            *figure_links(comparison.figures, "retrieval"),
        ]
    if comparison.lds is not None:
        parts += lds_section(comparison.lds, comparison.figures)
    return "\n".join(parts) + "\n"


LDS_NOTE = (
    "The linear datamodeling score (LDS; Park et al. 2023): the model was fine-tuned on random "
    "subsets of the train examples (`gradproj retrain`); per test example, the Spearman "
    "correlation across subsets between the summed scores of a subset's train examples and "
    "minus the test example's loss after training on it; the mean over test examples with a "
    "95% bootstrap CI over test examples. 1: the scores predict which subsets help each test "
    "example; 0: they do not. Methods and limits: docs/lds.md of gradproj.\n"
)


def lds_section(table: pd.DataFrame, paths: list[Path]) -> list[str]:
    return [
        "\n## Which ranking is influence: linear datamodeling score\n",
        LDS_NOTE,
        markdown_table(lds_cells(table)),
        *figure_links(paths, "lds"),
    ]


def lds_cells(table: pd.DataFrame) -> pd.DataFrame:
    cells = table[["method", "function", "n_test"]].copy()
    cells["lds"] = [
        f"{r.lds:.3f} [{r.lds_ci_low:.3f}, {r.lds_ci_high:.3f}]" for r in table.itertuples()
    ]
    return cells


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
