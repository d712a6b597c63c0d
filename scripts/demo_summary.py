"""Print the demo's short tables from compare_projections.py's report directory: per
projection and function, the median Kendall tau against the full gradient beside how often each
test example's known source is ranked first / in the top 5; then every method's retrieval; then,
when the report has one, every method's linear datamodeling score (LDS), best first."""

import argparse
from pathlib import Path

import pandas as pd

from gradproj.analysis.report import lds_cells, retrieval_cells


def agreement_table(report: Path) -> pd.DataFrame:
    summary = pd.read_csv(report / "summary.csv")
    retrieval = pd.read_csv(report / "retrieval.csv")
    kendall = summary[(summary.comparison == "reference") & (summary.metric == "kendall_tau")]
    embeddings = retrieval[retrieval.method.str.startswith("embeddings ")]
    table = []
    for row in embeddings.itertuples():
        label = row.method.removeprefix("embeddings ")
        tau = kendall[(kendall.candidate == label) & (kendall.function == row.function)]
        table.append(
            {
                "projection": label,
                "function": row.function,
                "kendall_vs_full": float(tau["median"].iloc[0]) if len(tau) else 1.0,
                "source_top1": row.top1,
                "source_top5": row.top5,
                "source_mrr": row.mrr,
            }
        )
    return pd.DataFrame(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--report", type=Path, required=True, help="compare_projections.py output")
    args = p.parse_args()
    print("Input-embedding gradient: agreement with the full gradient and retrieval of the source")
    table = agreement_table(args.report)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    retrieval = pd.read_csv(args.report / "retrieval.csv")
    print(
        f"\nEvery method: retrieval of the source (mean [95% CI], {retrieval.n_test.iloc[0]} test)"
    )
    print(retrieval_cells(retrieval).to_string(index=False))
    if (args.report / "lds.csv").is_file():
        lds = pd.read_csv(args.report / "lds.csv")
        print(
            f"\nEvery method, best first: linear datamodeling score (mean [95% CI], "
            f"{lds.n_test.max()} test; halves: on each half of the subsets)"
        )
        print(lds_cells(lds).to_string(index=False))
    print(f"\nreport: {args.report / 'report.md'}\nfigures: {args.report}/*.png")


if __name__ == "__main__":
    main()
