#!/usr/bin/env python
"""LDS and cost of preconditioned scores (`gradproj score --precondition gram`) against plain ones.

For each variant found under --gradients (`<variant>/<model>/{train/train,test/test}/0`, as the
demo writes them): computes the train run's factorization (timed, stored under --out), scores
the runs plainly and with `gram` at each --damping (timed), and times the whitening of the
train vectors alone (the extra cost per example). With --ground_truth (a `gradproj retrain`
file: `masks` [M, n_train], `losses` [M, n_test], ids in its metadata) it adds each scoring's
LDS by `gradproj compare --lds`'s own code (`gradproj.analysis.lds`: per test example, the
Spearman correlation across the M subsets between the summed scores of the subset's train
examples and minus the loss; the mean over test examples with a percentile bootstrap 95% CI
over test examples, 2000 resamples, seed 0), which also reads a ground truth still being
written. BM25 and random rankings are scored the same way as baselines; the paired differences
and the fused row are compare's (`lds_pairs.csv`).

  python bench/lds_preconditioned.py --gradients /work/wt/demo_output/gradients \
      --out /work/wt/i22_out --ground_truth GT.safetensors --dampings 1.0,0.1
"""

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gradproj import curvature, influence, scoredir, store  # noqa: E402
from gradproj.analysis.lds import lds_statistics, per_test_lds  # noqa: E402
from gradproj.analysis.retrieval import (  # noqa: E402
    bm25_scores,
    dataset_rows,
    find_sources,
    read_rows,
    retrieval_statistics,
    source_ranks,
)
from gradproj.data import conversation_text  # noqa: E402
from gradproj.extract.factors import compute_kfac  # noqa: E402

VARIANTS = (
    "full", "params_kronecker_8x8", "params_kronecker_16x16", "params_kronecker_32x32",
    "params_rademacher_1024", "rademacher_512", "rademacher_4096", "rademacher_32768", "hidden",
)  # fmt: skip


def runs_of(root: Path, variant: str):
    found = {}
    for split in ("train", "test"):
        paths = list((root / variant).glob(f"*/{split}/{split}/0/manifest.json"))
        if len(paths) != 1:
            return None
        found[split] = paths[0].parent
    return found["train"], found["test"]


def timed(fn, *args):
    began = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - began


def score(train, test, output: Path, **options) -> float:
    cfg = influence.ScoreConfig(str(train), str(test), output=str(output), device="cpu", **options)
    return timed(influence.score_influence, cfg)[1]


def costs(train: Path, factor_path: Path, kind: str) -> dict:
    """One-off factorization seconds and bytes; whitening seconds per train example."""
    run = store.Run(train)
    if factor_path.is_file():
        factor_path.unlink()  # time it from scratch
    compute = compute_kfac if kind == "kfac" else curvature.compute_gram
    factorization, seconds = timed(compute, run, "cpu")
    curvature.save(factorization, factor_path)
    whiten = curvature.make_whitener(factorization, 1.0, "cpu")
    _, vectors = run.load_matrix()
    _, whiten_seconds = timed(whiten, vectors.double())
    return {
        "factorization_s": seconds,
        "factorization_mib": whiten.nbytes / 2**20,
        "blocks": factorization.blocks.count,
        "k": factorization.blocks.k,
        "whiten_ms_per_example": 1e3 * whiten_seconds / len(vectors),
    }


def load_truth(path: Path, id_runs):
    """(masks [M, n_train], losses [M, n_test], train ids, test ids) of a ground-truth file, or
    of the finished subsets of a `gradproj retrain` still running (its `.parts` directory:
    `subset_*.safetensors` with `mask` and `losses`; the ids, which only the final file
    records, are then the extraction runs' `id_runs`, in manifest order: the same examples in
    the same dataset order, checked by count)."""
    if path.is_dir():
        masks, losses = [], []
        for part in sorted(path.glob("subset_*.safetensors")):
            with safe_open(str(part), framework="pt") as f:
                masks.append(f.get_tensor("mask").numpy())
                losses.append(f.get_tensor("losses").double().numpy())
        train_ids, test_ids = (store.Run(p).ids for p in id_runs)
        masks, losses = np.stack(masks), np.stack(losses)
        assert masks.shape[1] == len(train_ids) and losses.shape[1] == len(test_ids)
        print(f"ground truth: {len(masks)} finished subsets of {path}", file=sys.stderr)
        return masks.astype(np.float64), losses, train_ids, test_ids
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["gradproj"])
        masks, losses = f.get_tensor("masks").numpy(), f.get_tensor("losses").double().numpy()
    return masks.astype(np.float64), losses, info["train_ids"], info["test_ids"]


def lds(truth, scores: np.ndarray, train_ids: list, test_ids: list) -> dict:
    """`gradproj compare --lds`'s own LDS (gradproj.analysis.lds), in the ground truth's order."""
    masks, losses, gt_train, gt_test = truth
    cols = [train_ids.index(i) for i in gt_train]
    rows = [test_ids.index(i) for i in gt_test]
    stats = lds_statistics(per_test_lds(masks, losses, scores[np.ix_(rows, cols)]))
    return {"n_test": stats["n_test"], "lds": stats["lds"]} | {
        "ci_low": stats["lds_ci_low"], "ci_high": stats["lds_ci_high"]
    }  # fmt: skip


def retrieval(sd, function: str) -> dict:
    """Top-1 share and MRR of each test example's paraphrase source (`source_id`)."""
    sources = find_sources(*reversed(dataset_rows(sd)), sd, "source_id")
    stats = retrieval_statistics(source_ranks(sd, function, sources))
    return {"top1": stats["top1"], "mrr": stats["mrr"]}


def baselines(truth, train: Path, test: Path) -> list[dict]:
    manifests = [store.Run(p).manifest for p in (train, test)]
    rows = [read_rows(m.dataset, m.split) for m in manifests]
    train_ids, test_ids = truth[2], truth[3]
    sides = zip(rows, (train_ids, test_ids), strict=True)
    texts = [[conversation_text(r[i]) for i in ids] for r, ids in sides]
    bm25 = bm25_scores(*texts)
    rand = np.random.default_rng(0).random(bm25.shape)
    return [
        {"variant": "bm25", "precondition": "-", "function": "bm25"}
        | lds(truth, bm25, train_ids, test_ids),
        {"variant": "random", "precondition": "-", "function": "random"}
        | lds(truth, rand, train_ids, test_ids),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gradients", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ground_truth", type=Path, help="a retrain file, or its .parts dir")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dampings", default="1.0")
    parser.add_argument("--kinds", default="gram,kfac", help="preconditioners to measure")
    parser.add_argument("--skip_scoring", action="store_true", help="reuse --out's scores")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    id_runs = runs_of(args.gradients, "hidden")
    truth = load_truth(args.ground_truth, id_runs) if args.ground_truth else None
    table, cost_rows, some_runs = [], [], None
    for variant in args.variants.split(","):
        runs = runs_of(args.gradients, variant)
        if runs is None:
            print(f"{variant}: no train and test run, skipped", file=sys.stderr)
            continue
        some_runs = runs
        ragged = store.Run(runs[0]).stored_rows()[0]  # full embedding gradients: plain only
        kinds = [] if ragged else ["gram"] + (["kfac"] if "kronecker" in variant else [])
        kinds = [k for k in kinds if k in args.kinds.split(",")]
        settings = [("none", None)] + [
            (kind, float(d)) for kind in kinds for d in args.dampings.split(",")
        ]
        for kind in kinds if not args.skip_scoring else []:
            factor = args.out / "curvature" / f"{variant}_{kind}.safetensors"
            factor.parent.mkdir(parents=True, exist_ok=True)
            cost_rows.append({"variant": variant, "kind": kind} | costs(runs[0], factor, kind))
            print(json.dumps(cost_rows[-1]), flush=True)
        for kind, damping in settings:
            name = variant if kind == "none" else f"{variant}_{kind}_{damping:g}"
            out = args.out / "scores" / name
            if not args.skip_scoring:
                factor = args.out / "curvature" / f"{variant}_{kind}.safetensors"
                extra = {} if kind == "none" else {
                    "precondition": kind, "damping": damping, "curvature": str(factor)
                }  # fmt: skip
                seconds = score(*runs, out, **extra)
                cost_rows.append({"variant": variant, "kind": f"score {kind} {damping}",
                                  "score_s": seconds})  # fmt: skip
            if not (out / scoredir.SCORES_FILE).is_file():
                print(f"{out}: not scored (yet), left out", file=sys.stderr)
                continue
            sd = scoredir.load_score_dir(out)
            for function, matrix in sd.scores.items():
                row = {"variant": variant, "precondition": kind, "damping": damping,
                       "function": function} | retrieval(sd, function)  # fmt: skip
                if truth is not None:
                    row |= lds(truth, matrix, sd.train_ids, sd.test_ids)
                table.append(row)
                print(json.dumps(row), flush=True)
    if truth is not None and some_runs is not None:
        table += baselines(truth, *some_runs)
    args.out.mkdir(parents=True, exist_ok=True)
    if cost_rows and (args.out / "costs.csv").is_file():  # keep the other variants' rows
        with open(args.out / "costs.csv", newline="") as f:
            done = {r["variant"] for r in cost_rows}  # (older rows without "kind": gram)
            cost_rows = [r for r in csv.DictReader(f) if r["variant"] not in done] + cost_rows
    for name, rows in (("scores.csv", table), ("costs.csv", cost_rows)):
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            with open(args.out / name, "w", newline="") as f:
                writer = csv.DictWriter(f, keys)
                writer.writeheader()
                writer.writerows(rows)
    for row in table:
        damping = row.get("damping") or ""
        found = f"top1 {row['top1']:.2f} mrr {row['mrr']:.2f}" if "top1" in row else ""
        ci = f"{row['lds']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" if "lds" in row else ""
        print(f"{row['variant']:28} {row['precondition']:5} {damping:>5} {row['function']:7} "
              f"{found} {ci}")  # fmt: skip


if __name__ == "__main__":
    main()
