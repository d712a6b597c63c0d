"""Compare projected influence scores with a reference (usually full-gradient) score directory.

Example:
    python compare_projections.py --reference scores/full --candidates scores/rademacher_* \
        --output results/comparison

The original study's published JSON lists, agreement recomputed both ways:
    python compare_projections.py --original_json explainability/16777216/OLMO/cosine \
        explainability/8192/OLMO/rademacher/cosine --output results/original
"""

import argparse
from pathlib import Path

from gradproj.errors import UserError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reference",
        type=Path,
        help="score directory of the reference (usually the full gradients)",
    )
    parser.add_argument(
        "--candidates",
        type=Path,
        nargs="+",
        help="score directories of the projections to compare",
    )
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        help="directory for metrics.csv, summary.csv, figures and report.md",
    )
    parser.add_argument(
        "--reference_run",
        type=Path,
        default=None,
        help="full-gradient run of the train examples (gradient norms, emulation);"
        " default: the train_run recorded in the reference scores",
    )
    parser.add_argument(
        "--test_run",
        type=Path,
        default=None,
        help="full-gradient run of the test examples; default: from the scores",
    )
    parser.add_argument(
        "--emulate_original",
        action="store_true",
        help="also emulate the original pipeline step by step (ablation table)",
    )
    parser.add_argument(
        "--fp16_runs",
        type=Path,
        nargs=2,
        metavar=("TRAIN_RUN", "TEST_RUN"),
        help="full-gradient runs extracted with --dtype fp16 (the emulation's fp16_model step);"
        " default: the fp32 gradients rounded to fp16",
    )
    parser.add_argument(
        "--original_json",
        type=Path,
        nargs="+",
        metavar=("REFERENCE_DIR", "CANDIDATE_DIR"),
        help="instead: folders of the original study's JSON lists (explainability/<dim>/<where>/"
        "<func>), the reference first; agreement the notebook's way and correctly",
    )
    parser.add_argument(
        "--nan_id",
        default="open_orca_t0.1598436",
        help="with --original_json: the id the notebook drops from every list",
    )
    parser.add_argument(
        "--top_k",
        type=int,
        nargs="+",
        default=[10, 50, 100],
        help="k of top-k overlap and NDCG@k (default: 10 50 100)",
    )
    parser.add_argument("--n_permutations", type=int, default=1000)
    parser.add_argument("--n_bootstrap", type=int, default=2000)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the permutation tests, bootstrap and theory simulation",
    )
    parser.add_argument(
        "--flag_margin",
        type=float,
        default=0.1,
        help="flag a measured median Kendall tau this far below the prediction",
    )
    parser.add_argument("--device", default="cpu", help="device of the emulated projections")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.original_json:
        return original_json(args)
    from gradproj.analysis import CompareConfig, compare_projections

    if not (args.reference and args.candidates):
        raise UserError("give --reference and --candidates (or --original_json REF CAND...)")
    config = CompareConfig(
        reference=args.reference,
        candidates=args.candidates,
        output=args.output,
        reference_run=args.reference_run,
        test_run=args.test_run,
        emulate_original=args.emulate_original,
        fp16_runs=tuple(args.fp16_runs) if args.fp16_runs else None,
        top_ks=tuple(args.top_k),
        n_permutations=args.n_permutations,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
        flag_margin=args.flag_margin,
        device=args.device,
    )
    compare_projections(config)
    print(f"wrote {config.output / 'report.md'}")
    return 0


def original_json(args: argparse.Namespace) -> int:
    from gradproj.analysis.original_json import compare_original_json
    from gradproj.analysis.report import markdown_table

    if len(args.original_json) < 2:
        raise UserError("--original_json needs a reference folder and at least one candidate")
    reference, *candidates = args.original_json
    table = compare_original_json(reference, candidates, args.output, args.nan_id)
    print(markdown_table(table), end="")
    print(f"wrote {args.output / 'original_json_summary.csv'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
