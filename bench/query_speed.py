#!/usr/bin/env python
"""Time `gradproj query` for one answer against a train run, as a user runs it (a new process:
imports, model load, the query's gradient and projection, scoring, the train texts).

Each repeat is its own process, after one warm-up run that fills the caches (the bundled model's
conversion, compiled kernels). Reports the wall time, the CPU time (user + system) of the
process, and the machine's load average when it started: on a shared machine the wall time
depends on the others, the CPU time much less.

  python bench/query_speed.py \
      --train demo_output/gradients/rademacher_4096/smollm2-135m-instruct/train/train/0
"""

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "data" / "test.jsonl"


def run_once(argv: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    began = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(proc.stderr[-2000:])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    loop = re.search(r"done: .*? ([\d.]+) s, ", proc.stderr)
    return {"wall": wall, "cpu": cpu, "load": load, "gradient": float(loop.group(1))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", required=True, help="train run directory")
    p.add_argument("--row", type=int, default=0, help="row of examples/data/test.jsonl to ask")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    query = Path("/tmp") / f"gradproj_bench_query_{os.getpid()}.jsonl"
    query.write_text(EXAMPLE.read_text().splitlines()[args.row] + "\n")
    os.environ.update(
        OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"
    )
    argv = [sys.executable, "-m", "gradproj", "query", "--train", args.train,
            "--messages", str(query), "--device", "cpu", "--format", "json"]  # fmt: skip
    try:
        run_once(argv)  # warm-up: caches
        runs = [run_once(argv) for _ in range(args.repeat)]
    finally:
        query.unlink()
    print(f"gradproj query, row {args.row} of {EXAMPLE.name}, against {args.train}")
    for r in runs:
        print(f"wall {r['wall']:.1f} s, CPU {r['cpu']:.1f} s (user + system), of which the "
              f"query's gradient and projection {r['gradient']:.1f} s wall; load average "
              f"{r['load']:.1f} at the start")  # fmt: skip


if __name__ == "__main__":
    main()
