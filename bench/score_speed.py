#!/usr/bin/env python
"""Benchmark of score_influence against the straightforward approach (load all, one matmul).

For each k: writes a synthetic projected train run (n_train x k, fp32, 1,000 per shard, as
extract_gradients.py writes them) and test run, then times, each in its own process:
  ours      score_influence.py --func both (streaming, fp64 accumulation, checksums verified);
  baseline  Run.load_matrix() of both runs, one fp32 matmul for dot, normalised rows for cosine.
Reports seconds, peak memory (host RSS; GPU: max allocated), the baseline's max error against
ours relative to the largest |score|, and the time extrapolated linearly in n_train.

  python bench/score_speed.py --n_train 20000 --n_test 200 --dims 8192,204800 --device cpu
  python bench/score_speed.py --n_train 100000 --n_test 500 --dims 16384 --device cuda \
      --extrapolate 381000
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gradproj import scoredir, store  # noqa: E402

PER_FILE = 1000

OURS = """
import json, resource, sys, time, torch
sys.path.insert(0, {repo!r})
from gradproj.cli import score_main as main
began = time.time()
main({argv!r})
print(json.dumps({{"seconds": time.time() - began,
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0}}))
"""

BASELINE = """
import json, resource, sys, time, torch
import torch.nn.functional as F
from safetensors.torch import save_file
sys.path.insert(0, {repo!r})
from gradproj import store
began = time.time()
_, train = store.Run({train!r}).load_matrix()
_, test = store.Run({test!r}).load_matrix()
train, test = train.to({device!r}), test.to({device!r})
dot = test @ train.T
cosine = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
save_file({{"dot": dot.cpu(), "cosine": cosine.cpu()}}, {out!r})
print(json.dumps({{"seconds": time.time() - began,
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0}}))
"""


def write_run(path: Path, n: int, k: int, seed: int, name: str) -> Path:
    header = {
        "kind": "projected", "target": "embeddings", "model": "bench", "checkpoint": "main",
        "dataset": name, "split": "train", "hidden_size": 0, "max_seq_length": 0,
        "projection": {"type": "rademacher", "seed": 42, "dim": k}, "shard_size": PER_FILE,
    }  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    fresh = {}
    for start, end in store.shard_ranges(0, n, PER_FILE):
        # correlated like real gradients: a shared direction plus noise, norms ~ 1
        vectors = (torch.randn(end - start, k, generator=gen) + 0.3) / k**0.5
        examples = [{"index": i, "id": f"{name}{i}", "tokens": 1, "grad_norm": 1.0}
                    for i in range(start, end)]  # fmt: skip
        index = torch.arange(start, end)
        record = store.ShardRecord(examples, [])
        entry = store.write_shard(path, start, end, {"vectors": vectors, "index": index}, record)
        fresh[entry["file"]] = entry
    store.merge_manifest(path, header, n, PER_FILE, fresh)
    return path


def run_child(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available_gb() -> float:
    from gradproj.influence import available_host_bytes

    return available_host_bytes() / 2**30


def max_relative_difference(ours: Path, baseline: Path) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(str(ours)), load_file(str(baseline))
    return {
        name: ((a[name].double() - b[name].double()).abs().max() / a[name].abs().max()).item()
        for name in ("dot", "cosine")
    }


def bench_dim(args, k: int, work: Path) -> dict:
    began = time.time()
    train = write_run(work / f"train_{k}", args.n_train, k, 0, "train")
    test = write_run(work / f"test_{k}", args.n_test, k, 1, "test")
    result = {
        "k": k,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "device": args.device,
        "train_gb": args.n_train * k * 4 / 2**30,
        "setup_seconds": time.time() - began,
    }
    argv = ["--train", str(train), "--test", str(test), "--output", str(work / f"ours_{k}"),
            "--func", "both", "--device", args.device]  # fmt: skip
    if args.memory_gb:
        argv += ["--memory_gb", str(args.memory_gb)]
    result["ours"] = run_child(OURS.format(repo=str(REPO), argv=argv))
    needed = 2 * result["train_gb"] + 1  # load_matrix concatenates: the blocks and the copy
    if not args.baseline or (args.device == "cpu" and needed > 0.9 * available_gb()):
        result["baseline"] = {"skipped": f"needs about {needed:.0f} GB, {available_gb():.0f} free"}
    else:
        out = str(work / f"baseline_{k}.safetensors")
        code = BASELINE.format(repo=str(REPO), train=str(train), test=str(test), out=out,
                               device=args.device)  # fmt: skip
        result["baseline"] = run_child(code)
        if "error" not in result["baseline"]:
            ours = work / f"ours_{k}" / scoredir.SCORES_FILE
            result["baseline_error_vs_ours"] = max_relative_difference(ours, Path(out))
    if args.extrapolate and "seconds" in result["ours"]:
        factor = args.extrapolate / args.n_train
        result["extrapolated"] = {
            "n_train": args.extrapolate,
            "ours_seconds": result["ours"]["seconds"] * factor,
        }
    shutil.rmtree(work / f"train_{k}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n_train", type=int, default=20000)
    p.add_argument("--n_test", type=int, default=200)
    p.add_argument("--dims", default="8192,204800")
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory_gb", type=float, default=None, help="budget for ours")
    p.add_argument("--no_baseline", dest="baseline", action="store_false")
    p.add_argument("--extrapolate", type=int, default=None, help="n_train to extrapolate to")
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="score_bench_"))
    results = []
    try:
        for k in (int(x) for x in args.dims.split(",")):
            results.append(bench_dim(args, k, work))
            print(json.dumps(results[-1]), flush=True)
            if args.json:  # after each dim: a run stopped at a time limit keeps what it measured
                Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
