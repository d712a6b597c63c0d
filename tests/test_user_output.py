"""What a user sees: the comparison's progress, the report's definitions, the dot-vs-cosine
figure's axes, and scoring not repeating the extraction's warnings."""

import re

import matplotlib
import pandas as pd

from gradproj.analysis import CompareConfig, compare_projections, figures
from gradproj.analysis.report import HEADLINE_METRICS, metric_definition
from tests.test_analysis import score_dirs  # noqa: F401  (a fixture)


def test_comparison_reports_each_step_and_defines_its_metrics(tmp_path, score_dirs, capsys):  # noqa: F811
    full, candidates = score_dirs
    config = CompareConfig(full, candidates, tmp_path / "out", top_ks=(10, 20), n_bootstrap=20)
    compare_projections(config)
    progress = capsys.readouterr().err
    assert re.search(r"compare: 100%.* 7/7 .*tables, figures, report", progress), progress
    report = (tmp_path / "out" / "report.md").read_text()
    shown = ["kendall_tau", "spearman_rho", "top10_overlap", "ndcg@10", "ndcg_original"]
    for metric in shown:
        assert f"- `{metric}`: {metric_definition(metric)}." in report, metric
    assert "share of the reference's 10 highest-scored" in report


def test_every_headline_metric_has_a_definition():
    for metric in (*HEADLINE_METRICS, "top50_overlap", "ndcg@50"):
        assert metric_definition(metric)
    assert "50 highest" in metric_definition("top50_overlap")


def test_dot_vs_cosine_figure_labels_every_panel(tmp_path, monkeypatch):
    """Seven directories in three columns: the last row has one panel, two hidden; the panels
    above the hidden ones still carry their own axis labels and tick labels."""
    matplotlib.use("Agg")
    rows = [
        {"comparison": "dot_vs_cosine", "metric": "kendall_tau", "candidate": f"d{i}", "value": v}
        for i in range(7)
        for v in (0.2, 0.5, 0.9)
    ]
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or path)
    figures.dot_cosine_histogram(pd.DataFrame(rows), tmp_path / "f.png")
    (fig,) = drawn
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 7
    for ax in panels:
        assert ax.get_xlabel() == figures.metric_label("kendall_tau"), ax.get_title()
        assert ax.get_ylabel() == "test examples"
        assert any(t.get_visible() and t.get_text() for t in ax.get_xticklabels()), ax.get_title()
        assert any(t.get_visible() and t.get_text() for t in ax.get_yticklabels()), ax.get_title()
