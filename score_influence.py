#!/usr/bin/env python
"""Score every train example against every test example (dot product and/or cosine).

  python score_influence.py --train gradients/rademacher_8192/M/tulu/train/0 \
      --test gradients/rademacher_8192/M/ultrachat/train/0 --func both --mapped

Writes scores.safetensors ([n_test, n_train] fp32 per function), topk.jsonl and summary.json
(and mapped/<test row>.json with --mapped) to --output, by default
./explainability/<dim or full>/<train dataset>__<test dataset>/<func>/.
"""

import argparse
import sys
import time

from gradproj.errors import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", required=True, help="train run directory (extract_gradients.py)")
    p.add_argument("--test", required=True, help="test run directory")
    p.add_argument("--func", default="both", choices=["dot", "cosine", "both"])
    p.add_argument("--output", default=None, help="score directory (default: see above)")
    p.add_argument(
        "--where",
        default=None,
        help="replaces <train dataset>__<test dataset> in the default output",
    )
    p.add_argument(
        "--mapped",
        action="store_true",
        help="also write mapped/<test row>.json, sorted, with the train samples' fields",
    )
    p.add_argument(
        "--top_k", type=int, default=100, help="top and bottom k per test example in topk.jsonl"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument(
        "--dataset", default=None, help="dataset for --mapped (default: the train run's)"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "fp64"],
        help="stored scores: fp32 (fp64 arithmetic, rounded once) or fp64",
    )
    p.add_argument(
        "--memory_gb",
        type=float,
        default=None,
        help="working memory budget (default: half the free memory)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gradproj import influence

    began = time.time()
    out = influence.score_influence(influence.ScoreConfig(**vars(args)))
    print(f"scores written to {out} in {time.time() - began:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
