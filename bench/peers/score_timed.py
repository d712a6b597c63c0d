"""One gradproj scoring, timed after the imports (gradproj venv): the factorization of
`--precondition` (computed into `--curvature`, a fresh file) and the scoring itself, which
reads it back. Prints one JSON line: factorization_s, scoring_s."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gradproj import curvature, store
from gradproj.influence import ScoreConfig, score_influence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--precondition", default="none")
    parser.add_argument("--curvature")
    parser.add_argument("--func", default="dot")
    args = parser.parse_args()
    factorization = 0.0
    if args.precondition != "none":
        path = Path(args.curvature)
        path.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        curvature.load_or_compute(args.precondition, store.Run(args.train), path, "cpu")
        factorization = time.perf_counter() - start
    config = ScoreConfig(
        train=args.train, test=args.test, func=args.func, output=args.output, top_k=10,
        device="cpu", precondition=args.precondition, curvature=args.curvature,
    )  # fmt: skip
    start = time.perf_counter()
    score_influence(config)
    scoring = time.perf_counter() - start
    print(json.dumps({"factorization_s": factorization, "scoring_s": scoring}))


if __name__ == "__main__":
    main()
