#!/usr/bin/env python
"""LDS on the paraphrase set against LDS on the far set (docs/lds_far.png), and the held-out
pairs of the README's recommendation on the far set.

Reads two `gradproj compare --lds` outputs (lds.csv of the paraphrase set's report and of the far
set's, e.g. demo_output/report and demo_output/report_far) and draws

- left: each method's LDS on the paraphrase set (x) against the far set (y), with their 95% CIs;
- right: the far set's LDS against the projection dim per target and preconditioner (dot; the
  unprojected LDS as a dashed line), the study's question asked again on the far set.

With --ground_truth (the far set's `gradproj retrain` file) and --scores (the far set's score
directories), it also prints and writes (--pairs CSV) the paired differences of the method
chosen on the paraphrase set (--chosen, default the README's: params kronecker 16x16 · gram,
damping 1, dot) against every other method on the far set, by
`gradproj.analysis.lds.paired_difference`: the mean per-test difference with its paired
bootstrap 95% CI (test examples resampled).

  python bench/lds_far.py --near demo_output/report/lds.csv --far demo_output/report_far/lds.csv \
      --output docs/lds_far.png --ground_truth examples/ground_truth_far.safetensors \
      --scores demo_output/scores_far/* demo_output/retrieval_scores_far/* \
      --pairs demo_output/report_far/held_out_pairs.csv
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHOSEN = ("params kronecker_16x16, 210 modules · gram", "dot")


def label(row) -> str:
    return row.method if row.function in (row.method, "") else f"{row.method} ({row.function})"


def figure(near: pd.DataFrame, far: pd.DataFrame, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = near.merge(far, on=["method", "function"], suffixes=("_near", "_far"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    for row in both.itertuples():
        xerr = [[row.lds_near - row.lds_ci_low_near], [row.lds_ci_high_near - row.lds_near]]
        yerr = [[row.lds_far - row.lds_ci_low_far], [row.lds_ci_high_far - row.lds_far]]
        left.errorbar(row.lds_near, row.lds_far, xerr=xerr, yerr=yerr, fmt="o", ms=4, alpha=0.7)
        if row.function in ("dot", "bm25", "random") or row.target_near == "fused":
            name = label(pd.Series({"method": row.method, "function": row.function}))
            left.annotate(name.replace(", 210 modules", ""), (row.lds_near, row.lds_far),
                          fontsize=6.5, xytext=(3, 3), textcoords="offset points")  # fmt: skip
    low = min(both.lds_ci_low_near.min(), both.lds_ci_low_far.min(), 0) - 0.05
    high = max(both.lds_ci_high_near.max(), both.lds_ci_high_far.max()) + 0.05
    left.plot([low, high], [low, high], color="grey", lw=0.8, ls=":")
    left.set(xlim=(low, high), ylim=(low, high), xlabel="LDS, paraphrase set (test.jsonl)",
             ylabel="LDS, far set (test_far.jsonl)",
             title="LDS per method on both test sets (95% CIs)")  # fmt: skip
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shown = far[far.function.isin(["dot", "bm25"])]
    groups = shown.groupby(["target", "precondition"], dropna=False)
    for k, ((target, precondition), rows) in enumerate(groups):
        color = colors[k % len(colors)]
        projected = rows[rows.dim.notna()].sort_values("dim")
        name = f"{target}" + ("" if precondition == "none" else f" · {precondition}")
        if len(projected):
            right.errorbar(projected.dim, projected.lds, marker="o", label=name, color=color,
                           yerr=[projected.lds - projected.lds_ci_low,
                                 projected.lds_ci_high - projected.lds])  # fmt: skip
        for row in rows[rows.dim.isna()].itertuples():
            shown_as = name if pd.isna(row.projection) else f"{name}, {row.projection}"
            right.axhline(row.lds, ls="--", lw=1, color=color, label=shown_as)
    right.set(xscale="log", xlabel="dim (a projected vector's length)", ylabel="LDS, far set",
              title="Far set: LDS against the dim (dot; dashed: unprojected)")  # fmt: skip
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    print(f"wrote {output}")


def held_out_pairs(truth_path: str, score_paths: list[str], chosen, seed: int) -> pd.DataFrame:
    from gradproj.analysis.lds import lds_methods, paired_difference, per_test_lds
    from gradproj.scoredir import load_score_dir
    from gradproj.truth import load_ground_truth

    truth = load_ground_truth(truth_path)
    methods = lds_methods(truth, [load_score_dir(Path(p)) for p in score_paths], seed)
    per_test = {(m.method, m.function): per_test_lds(truth.masks, truth.losses, m.scores)
                for m in methods}  # fmt: skip
    if chosen not in per_test:
        raise SystemExit(f"{chosen} is not among {sorted(per_test)}")
    rows = []
    for (method, function), values in per_test.items():
        if (method, function) != chosen:
            rows.append({"chosen": chosen[0], "chosen_function": chosen[1], "other": method,
                         "other_function": function}
                        | paired_difference(per_test[chosen], values, 2000, seed))  # fmt: skip
    return pd.DataFrame(rows).sort_values("difference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--near", required=True, help="the paraphrase set's lds.csv")
    parser.add_argument("--far", required=True, help="the far set's lds.csv")
    parser.add_argument("--output", default=str(REPO / "docs" / "lds_far.png"))
    parser.add_argument("--ground_truth", help="the far set's ground truth, for the pairs")
    parser.add_argument("--scores", nargs="+", default=[], help="the far set's score dirs")
    parser.add_argument("--pairs", help="write the held-out pairs to this CSV")
    parser.add_argument("--chosen", nargs=2, default=CHOSEN, metavar=("METHOD", "FUNCTION"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    near, far = pd.read_csv(args.near), pd.read_csv(args.far)
    figure(near, far, Path(args.output))
    table = near.merge(far, on=["method", "function"], suffixes=("_near", "_far"), how="outer")
    columns = ["method", "function", "lds_near", "lds_far", "lds_ci_low_far", "lds_ci_high_far"]
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(table[columns].round(3).sort_values("lds_far", ascending=False).to_string())
    if args.ground_truth:
        pairs = held_out_pairs(args.ground_truth, args.scores, tuple(args.chosen), args.seed)
        with pd.option_context("display.width", 200, "display.max_colwidth", 60):
            print(pairs.round(3).to_string(index=False))
        if args.pairs:
            pairs.to_csv(args.pairs, index=False)
    return None


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
