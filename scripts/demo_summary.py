"""Print the demo's short table: per projection and function, the median Kendall tau against the
full gradient and how often each test example's known source is ranked first / in the top 5."""

import argparse
import json
from pathlib import Path

import pandas as pd

from gradproj.analysis import load_score_dir
from gradproj.analysis.retrieval import hit_rates, source_ranks


def summary_table(scores: Path, report: Path, test_data: Path) -> pd.DataFrame:
    rows = [json.loads(line) for line in test_data.read_text().splitlines() if line.strip()]
    source_of = {str(r["prompt_id"]): r["source_id"] for r in rows}
    summary = pd.read_csv(report / "summary.csv")
    kendall = summary[(summary.comparison == "reference") & (summary.metric == "kendall_tau")]
    table = []
    for path in sorted(p for p in scores.iterdir() if (p / "scores.safetensors").is_file()):
        score_dir = load_score_dir(path)
        for function in sorted(score_dir.scores):
            tau = kendall[(kendall.candidate == score_dir.label) & (kendall.function == function)]
            hits = hit_rates(source_ranks(score_dir, function, source_of))
            table.append(
                {
                    "projection": score_dir.label,
                    "dim": score_dir.dim or "full",
                    "function": function,
                    "kendall_vs_full": float(tau["median"].iloc[0]) if len(tau) else 1.0,
                    "source_top1": hits["top1"],
                    "source_top5": hits["top5"],
                }
            )
    table = pd.DataFrame(table)
    keys = {
        "_type": table.projection.str.split("_").str[0].replace("full", ""),
        "_dim": pd.to_numeric(table["dim"], errors="coerce"),
    }
    ordered = table.assign(**keys).sort_values(["_type", "_dim", "function"])
    return ordered.drop(columns=list(keys))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scores", type=Path, required=True, help="folder of score directories")
    p.add_argument("--report", type=Path, required=True, help="compare_projections.py output")
    p.add_argument("--test_data", type=Path, required=True, help="test set with source_id")
    args = p.parse_args()
    table = summary_table(args.scores, args.report, args.test_data)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"\nreport: {args.report / 'report.md'}\nfigures: {args.report}/*.png")


if __name__ == "__main__":
    main()
