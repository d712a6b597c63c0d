"""Compare projected influence scores with a reference (usually full-gradient) score directory.

Example:
    python compare_projections.py --reference scores/full --candidates scores/rademacher_* \
        --output results/comparison
"""

import argparse
from pathlib import Path

from gradproj.errors import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reference",
        type=Path,
        required=True,
        help="score directory of the reference (usually the full gradients)",
    )
    parser.add_argument(
        "--candidates",
        type=Path,
        nargs="+",
        required=True,
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
    parser.add_argument(
        "--retrieval",
        action="store_true",
        help="also rank each test example's known source train example (retrieval.csv): the"
        " compared scores, --retrieval_methods, BM25 and a random ranking",
    )
    parser.add_argument(
        "--retrieval_methods",
        type=Path,
        nargs="+",
        default=[],
        help="more score directories for the retrieval table only (other targets: params,"
        " hidden), over the same examples; implies --retrieval",
    )
    parser.add_argument(
        "--source_field",
        default="source_id",
        help="test set column naming each test example's source train id (default: source_id)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gradproj.analysis import CompareConfig, compare_projections

    config = CompareConfig(
        reference=args.reference,
        candidates=args.candidates,
        output=args.output,
        reference_run=args.reference_run,
        test_run=args.test_run,
        emulate_original=args.emulate_original,
        top_ks=tuple(args.top_k),
        n_permutations=args.n_permutations,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
        flag_margin=args.flag_margin,
        device=args.device,
        retrieval=args.retrieval,
        retrieval_methods=args.retrieval_methods,
        source_field=args.source_field,
    )
    compare_projections(config)
    print(f"wrote {config.output / 'report.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
