"""PNG figures of the comparison (matplotlib, Agg backend: no display needed)."""

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

FUNCTION_ORDER = ("dot", "cosine")
METRIC_LABELS = {
    "kendall_tau": "Kendall's tau-b",
    "spearman_rho": "Spearman's rho",
    "ndcg_original": "NDCG (original definition)",
}


def metric_label(metric: str) -> str:
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    if metric.startswith("top") and metric.endswith("_overlap"):
        return f"top-{metric[3:-8]} overlap"
    return metric.replace("ndcg@", "NDCG@")


def dim_label(dim: float) -> str:
    """8192 -> '8,192'; 2048000 -> '2.05M' (short enough for a tick label)."""
    dim = int(dim)
    return f"{dim / 1e6:.3g}M" if dim >= 1_000_000 else f"{dim:,}"


def violin_grid(metrics: pd.DataFrame, metric: str, path: Path) -> Path:
    """Metric by dim: rows dot/cosine, columns projection type (the original study's layout)."""
    data = metrics[(metrics.comparison == "reference") & (metrics.metric == metric)]
    functions = [f for f in FUNCTION_ORDER if f in set(data.function)]
    types = sorted(set(data.projection_type))
    fig, axes = plt.subplots(
        len(functions),
        len(types),
        figsize=(4.2 * len(types), 3.2 * len(functions)),
        squeeze=False,
        sharey=True,
        constrained_layout=True,
    )
    for row, function in enumerate(functions):
        for col, proj_type in enumerate(types):
            cell = data[(data.function == function) & (data.projection_type == proj_type)]
            _violins(axes[row, col], cell)
            axes[row, col].set_title(f"{function}, {proj_type}")
            axes[row, col].set_xlabel("projection dim k")
        axes[row, 0].set_ylabel(metric_label(metric))
    # two short lines: one line is wider than a one-column figure and was cut off at both edges
    fig.suptitle(f"{metric_label(metric)} against the reference\nper test example")
    return _save(fig, path)


def _violins(ax, cell: pd.DataFrame) -> None:
    dims = sorted(set(cell.dim))
    groups = [cell[cell.dim == d].value.dropna().to_numpy() for d in dims]
    positions = np.arange(len(dims))
    drawable = [i for i, g in enumerate(groups) if g.size > 1 and np.ptp(g) > 0]
    if drawable:
        ax.violinplot([groups[i] for i in drawable], positions[drawable], showmedians=True)
    for i, g in enumerate(groups):
        if g.size and i not in drawable:  # a constant group cannot be drawn as a violin
            ax.plot([i], [g[0]], "o", color="C0")
    ax.set_xticks(positions, [dim_label(d) for d in dims], rotation=30)
    ax.grid(axis="y", alpha=0.3)


def agreement_vs_dim(summary: pd.DataFrame, theory: pd.DataFrame, metric: str, path: Path) -> Path:
    """Median agreement vs k with bootstrap 95% CIs, and the JL prediction (dashed)."""
    data = summary[(summary.comparison == "reference") & (summary.metric == metric)]
    functions = [f for f in FUNCTION_ORDER if f in set(data.function)]
    fig, axes = plt.subplots(
        1,
        len(functions),
        figsize=(5.2 * len(functions), 3.8),
        squeeze=False,
        sharey=True,
        constrained_layout=True,
    )
    for ax, function in zip(axes[0], functions, strict=True):
        for i, (proj_type, line) in enumerate(
            data[data.function == function].groupby("projection_type")
        ):
            line = line.sort_values("dim")
            err = np.vstack([line["median"] - line.ci_low, line.ci_high - line["median"]])
            ax.errorbar(
                line.dim,
                line["median"],
                yerr=np.clip(err, 0, None),
                marker="o",
                capsize=3,
                color=f"C{i}",
                label=f"measured, {proj_type}",
            )
        predicted = theory[theory.function == function].sort_values("dim") if len(theory) else []
        if len(predicted):
            ax.plot(predicted.dim, predicted.predicted_median, "k--", label="JL prediction")
        _dim_ticks(ax, sorted(set(data.dim)))
        ax.set_title(function)
        ax.set_xlabel("projection dim k")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    axes[0, 0].set_ylabel(f"median {metric_label(metric)}")
    fig.suptitle(f"Median {metric_label(metric)} against the reference, by projection dim")
    return _save(fig, path)


def _dim_ticks(ax, dims: list[int]) -> None:
    """A log axis ticked at the measured dims, labelled as numbers (not 2 x 10^1)."""
    ax.set_xscale("log")
    ax.set_xticks(dims, [dim_label(d) for d in dims])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def dot_cosine_histogram(metrics: pd.DataFrame, path: Path, metric: str = "kendall_tau") -> Path:
    """Per score directory: histogram over test examples of dot-vs-cosine agreement."""
    data = metrics[(metrics.comparison == "dot_vs_cosine") & (metrics.metric == metric)]
    labels = list(dict.fromkeys(data.candidate))
    ncols = min(3, max(1, len(labels)))
    nrows = max(1, math.ceil(len(labels) / ncols))
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(4 * ncols, 3 * nrows),
        squeeze=False,
        sharex=True,
        sharey=True,
        constrained_layout=True,
    )
    values = data.value.dropna()
    # Shared bins so that the panels can be compared by eye.
    bins = np.linspace(values.min(), values.max(), 21) if values.nunique() > 1 else 20
    for ax, label in zip(axes.flat, labels, strict=False):
        per_test = data[data.candidate == label].value.dropna()
        ax.hist(per_test, bins=bins, color="C2")
        ax.set_title(f"{label} (median {per_test.median():.3f})", fontsize="medium")
        ax.set_xlabel(metric_label(metric))
        ax.set_ylabel("test examples")
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        # every panel its own axes: shared axes hide inner tick labels, and a hidden panel
        # below would leave a column without any
        ax.tick_params(labelbottom=True, labelleft=True)
    for ax in list(axes.flat)[len(labels) :]:
        ax.set_visible(False)
    fig.suptitle(f"Dot vs cosine ranking agreement ({metric_label(metric)})")
    return _save(fig, path)


# The original study's medians of Kendall's tau against the full gradient (OLMo-2-7B, 1,000 x 100
# examples, Rademacher), from its README and DAP_main_results.ipynb.
ORIGINAL_PUBLISHED = {"cosine": {8192: 0.46, 2_048_000: 0.58}, "dot": {8192: 0.99, 2_048_000: 0.99}}


def original_curves(ablation: pd.DataFrame, path: Path) -> Path:
    """Median Kendall tau vs k per emulated variant (none, exact_original, each step alone),
    beside the original's published medians: "the original's curves, reproduced". Variants whose
    curves coincide are drawn once, under one legend entry naming them all."""
    shown = ablation[~ablation.variant.str.startswith("exact_original_without_")]
    functions = [f for f in FUNCTION_ORDER if f in set(shown.function)]
    types = sorted(set(shown.projection_type))
    fig, axes = plt.subplots(
        len(types),
        len(functions),
        figsize=(5.6 * len(functions), 4.2 * len(types)),
        squeeze=False,
        sharey=True,
        constrained_layout=True,
    )
    for row, proj_type in enumerate(types):
        for col, function in enumerate(functions):
            ax = axes[row, col]
            cell = shown[(shown.function == function) & (shown.projection_type == proj_type)]
            for i, (names, line) in enumerate(coinciding_curves(cell)):
                bold = {"none", "exact_original"} & set(names)
                ax.plot(
                    line.dim,
                    line.kendall_median,
                    marker="o",
                    lw=2.5 if bold else 1.2,
                    ls="-" if bold else "--",
                    color="k" if "exact_original" in names else f"C{i % 10}",
                    label=curve_label(names),
                )
            _published_stars(ax, function, cell.dim)
            ax.set_xscale("log")
            ax.set_title(f"{function}, {proj_type}")
            ax.set_xlabel("projection dim k")
            ax.grid(alpha=0.3)
            # below its panel: the panels' curves coincide differently, and inside it the
            # legend hid a published star
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize="x-small")
        axes[row, 0].set_ylabel("median Kendall's tau vs full")
    fig.suptitle("The original's curves, reproduced (emulated pipeline on this model)")
    return _save(fig, path)


CURVE_TOLERANCE = 0.005  # medians closer than this at every dim cannot be told apart on the plot


def coinciding_curves(cell: pd.DataFrame) -> list[tuple[list[str], pd.DataFrame]]:
    """The variants' curves, those within CURVE_TOLERANCE of each other at every dim as one."""
    groups: list[tuple[list[str], pd.DataFrame]] = []
    for variant, line in cell.groupby("variant", sort=False):
        line = line.sort_values("dim")
        for names, first in groups:
            same_dims = list(first.dim) == list(line.dim)
            difference = np.abs(first.kendall_median.to_numpy() - line.kendall_median.to_numpy())
            if same_dims and np.all(difference < CURVE_TOLERANCE):
                names.append(variant)
                break
        else:
            groups.append(([variant], line))
    return groups


def curve_label(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return textwrap.fill(f"{', '.join(names)} (coinciding)", 44)


def _published_stars(ax, function: str, measured_dims: pd.Series) -> None:
    """The original's published medians, at their dims; a note where those lie outside the
    dims measured here (the original's model was OLMo-2-7B, this one is far smaller)."""
    published = ORIGINAL_PUBLISHED[function]
    low, high = measured_dims.min(), measured_dims.max()
    outside = [k for k in published if not low <= k <= high]
    note = " (beyond the dims measured here)" if outside else ""
    ax.plot(
        list(published),
        list(published.values()),
        "r*",
        markersize=12,
        label=f"original, published (OLMo-2-7B){note}",
    )
    for k, value in published.items():
        ax.annotate(
            f"{value:.2f} at {dim_label(k)}",
            (k, value),
            textcoords="offset points",
            xytext=(-9, 0),
            ha="right",
            va="center",
            fontsize="x-small",
            color="r",
        )
    if outside:
        ax.axvspan(low, high, color="0.9", zorder=0, label="dims measured here")
    ax.margins(y=0.1)


def retrieval_intervals(table: pd.DataFrame, path: Path) -> Path:
    """Top-1 hit rate and MRR of the source per method and function, with 95% bootstrap CIs."""
    labels = [f"{r.method} ({r.function})" if r.function != r.method else r.method
              for r in table.itertuples()]  # fmt: skip
    y = np.arange(len(table))[::-1]
    fig, axes = plt.subplots(
        1, 2, figsize=(10, 0.32 * len(table) + 1.4), sharey=True, constrained_layout=True
    )
    panels = (
        ("top1", "source ranked first", "share of test examples [95% CI]"),
        ("mrr", "MRR", "mean reciprocal rank of the source [95% CI]"),
    )
    for ax, (stat, title, xlabel) in zip(axes, panels, strict=True):
        err = np.vstack(
            [table[stat] - table[f"{stat}_ci_low"], table[f"{stat}_ci_high"] - table[stat]]
        )
        colors = [
            f"C{FUNCTION_ORDER.index(f) if f in FUNCTION_ORDER else 2}" for f in table.function
        ]
        ax.errorbar(table[stat], y, xerr=np.clip(err, 0, None), fmt="none", ecolor="0.6", capsize=3)
        ax.scatter(table[stat], y, c=colors, zorder=3)
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize="small")
    shown = [f for f in FUNCTION_ORDER if f in set(table.function)]
    handles = [_dot(f"C{FUNCTION_ORDER.index(f)}", f) for f in shown]
    if (~table.function.isin(FUNCTION_ORDER)).any():
        handles.append(_dot("C2", "no score function (bm25, random)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small")
    fig.suptitle(f"Finding each test example's source ({int(table.n_test.iloc[0])} test examples)")
    return _save(fig, path)


def _dot(color: str, label: str):
    return plt.Line2D([], [], marker="o", ls="", color=color, label=label)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def lds_figure(table: pd.DataFrame, path: Path) -> Path:
    """Left: LDS per method and function with 95% CIs. Right: LDS against the projection dim,
    one line per target, projection type and function; an unprojected LDS as a dashed line."""
    labels = [f"{r.method} ({r.function})" if r.function != r.method else r.method
              for r in table.itertuples()]  # fmt: skip
    y = np.arange(len(table))[::-1]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(12, 0.3 * len(table) + 1.6), constrained_layout=True
    )
    err = np.vstack([table.lds - table.lds_ci_low, table.lds_ci_high - table.lds])
    colors = [f"C{FUNCTION_ORDER.index(f) if f in FUNCTION_ORDER else 2}" for f in table.function]
    left.errorbar(table.lds, y, xerr=np.clip(err, 0, None), fmt="none", ecolor="0.6", capsize=3)
    left.scatter(table.lds, y, c=colors, zorder=3)
    left.axvline(0, color="k", lw=0.8)
    left.set_yticks(y, labels, fontsize="small")
    left.set_xlabel("LDS (mean over test examples, 95% CI)")
    left.grid(axis="x", alpha=0.3)
    gradients = table[table.projection.notna() & (table.target != "hidden")]
    gradients = gradients.assign(
        series=[t if p == "none" else f"{t} · {p}"
                for t, p in zip(gradients.target, gradients.precondition, strict=True)]
    )  # fmt: skip
    series = sorted(set(gradients.series))
    for (name, function), group in gradients.groupby(["series", "function"]):
        color = f"C{series.index(name) + 3}"  # C0-C2 mark functions on the left
        style = "-" if function == "cosine" else ":"
        for kind, line in group[group.dim.notna()].groupby("projection"):
            line = line.sort_values("dim")
            line_err = np.vstack([line.lds - line.lds_ci_low, line.lds_ci_high - line.lds])
            right.errorbar(
                line.dim, line.lds, yerr=np.clip(line_err, 0, None), capsize=3, color=color,
                ls=style, marker="o" if function == "cosine" else "s",
                label=f"{name} {kind} {function}",
            )  # fmt: skip
        for full in group[group.dim.isna()].lds:
            right.axhline(full, color=color, ls="--" if function == "cosine" else "-.", lw=1,
                          label=f"{name} full {function}")  # fmt: skip
    if (gradients.dim > 0).any():  # a log axis needs a positive dim to show
        right.set_xscale("log")
    right.set_xlabel("projected dim (all layers)")
    right.set_ylabel("LDS")
    right.grid(alpha=0.3)
    if right.lines:
        right.legend(fontsize="x-small", loc="best")
    fig.suptitle(f"Linear datamodeling score ({int(table.n_test.max())} test examples)")
    return _save(fig, path)
