"""Seconds per example of each projection, TRAK's BasicProjector, and the matmul roofline.

    python bench/projection_speed.py                       # CPU table (bench/RESULTS.md)
    python bench/projection_speed.py --device cuda --log2-dims 24 --ks 8192,16384,204800,2048000

Dense projections cost D * k per batch; where a point would take more than --max-entries
random entries, the first tokens of each gradient and the first 8192 columns (262144 on CUDA)
are timed and the time is scaled up by both ratios. The same code path: rows past an example's
length are skipped, and the first k' columns of the matrix are the k'-dim projection. Such rows
say so.
TRAK does not scale by 1/sqrt(k): only its time is compared.
"""

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

# Runnable as a plain script from a checkout, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gradproj.projection import make_projection  # noqa: E402

HIDDEN = 4096
# Columns timed at most: a few of the projector's blocks wide (2048 on CPU, 65536 on CUDA).
WIDEST_TIMED = {"cpu": 8192, "cuda": 262144}
TYPES = ("rademacher", "normal", "sjlt", "kronecker")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log2-dims", default="20,24", help="log2 of D, comma-separated")
    parser.add_argument("--ks", default="8192,16384,204800")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--roofline-batch", type=int, default=128)
    parser.add_argument("--roofline-log2-dim", type=int, default=20, help="log2 of its D")
    parser.add_argument("--tokens", type=int, default=0, help="non-zero rows per example (0: all)")
    parser.add_argument("--max-entries", type=float, default=2**32, help="dense entries timed")
    parser.add_argument("--no-trak", action="store_true")
    parser.add_argument("--json", help="also write the rows here, rewritten after each one")
    args = parser.parse_args()
    args.trak = not args.no_trak and trak_installed()
    return args


def trak_installed() -> bool:
    try:
        import trak.projectors  # noqa: F401
    except ImportError:
        print("traker is not installed: TRAK rows left out (pip install --no-deps traker==0.3.2)")
        return False
    return True


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, device: str, repeats: int = 3) -> float:
    """The fastest of `repeats` runs: the least disturbed by the rest of the machine."""
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(device: str) -> float:
    """Measured fp32 GFLOP/s of a large square matmul (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    n = 8192 if device.startswith("cuda") else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    seconds = timed(lambda: a @ b, device)
    return 2 * n**3 / seconds / 1e9


def make_grads(d: int, batch: int, tokens: int, device: str) -> list[torch.Tensor]:
    rows = d // HIDDEN
    length = min(tokens, rows) if tokens else rows
    return [torch.randn(length, HIDDEN, device=device) for _ in range(batch)]


def dense_extent(tokens: int, k: int, max_entries: float, device: str) -> tuple[int, int]:
    """(tokens, columns) to time: all, or a prefix of whole tokens at a few blocks' width."""
    if tokens * HIDDEN * k <= max_entries:
        return tokens, k
    columns = min(k, WIDEST_TIMED[torch.device(device).type])
    return max(1, min(tokens, int(max_entries // (columns * HIDDEN)))), columns


_TIMINGS: dict[tuple, float] = {}


def cached(key: tuple, measure) -> float:
    """A timing measured once per key: the same prefix of columns serves every larger k."""
    if key not in _TIMINGS:
        _TIMINGS[key] = measure()
    return _TIMINGS[key]


def time_ours(proj_type, shape, grads, k, max_entries, device) -> tuple[float, str]:
    """(seconds per batch, note) for one of our projectors."""
    length = grads[0].shape[0]
    tokens, columns = length, k
    if proj_type in TYPES[:2]:
        tokens, columns = dense_extent(length, k, max_entries, device)
    key = (proj_type, shape, len(grads), tokens, columns)
    prefix = [g[:tokens] for g in grads]
    seconds = cached(key, lambda: measure_ours(proj_type, shape, prefix, columns, device))
    if (tokens, columns) == (length, k):
        return seconds, ""
    note = f"timed {tokens} of {length} tokens, {columns} of {k} columns"
    return seconds * (length / tokens) * (k / columns), note


def measure_ours(proj_type, shape, grads, columns, device) -> float:
    projector = make_projection(proj_type, [columns], 0, shape, device=device)
    # Warm-up (kernels, BLAS handles, compilation) on one row, so that it costs nothing here.
    make_projection(proj_type, [64], 0, shape, device=device).project_batch([grads[0][:1]])
    return timed(lambda: projector.project_batch(grads), device)


def time_trak(proj_type, grads, k, device) -> tuple[float, str]:
    """(seconds per batch, note) for TRAK's BasicProjector: two 100-column blocks, scaled."""
    key = ("trak", proj_type, len(grads), grads[0].numel())
    seconds = cached(key, lambda: measure_trak(proj_type, grads, device))
    return seconds * k / 200, f"timed 200 of {k} columns"


def measure_trak(proj_type, grads, device) -> float:
    from trak.projectors import BasicProjector, ProjectionType

    flat = torch.stack([g.reshape(-1) for g in grads])
    projector = BasicProjector(
        grad_dim=flat.shape[1],
        proj_dim=200,
        seed=0,
        proj_type=ProjectionType(proj_type),
        device=device,
    )
    return timed(lambda: projector.project(flat, model_id=0), device)


ROWS: list[dict] = []


def print_row(d, k, method, seconds, batch, rate, note, json_path=None):
    per_example = seconds / batch
    roofline = ""
    if method in TYPES[:2]:
        share = 2 * batch * d * k / seconds / 1e9 / rate
        roofline = f"{100 * share:5.1f}%"
    print(f"| {d:>10} | {k:>8} | {method:<10} | {per_example:12.5f} | {roofline:>8} | {note} |")
    if json_path:  # as it goes: a run stopped at its time limit keeps the rows it measured
        ROWS.append({"d": d, "k": k, "method": method, "seconds": per_example, "batch": batch,
                     "roofline": roofline.strip(), "note": note})  # fmt: skip
        Path(json_path).write_text(json.dumps(ROWS, indent=1) + "\n")


def main() -> None:
    args = parse_args()
    device = args.device
    rate = matmul_rate(device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()
    print(
        f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"measured fp32 matmul rate: {rate:.1f} GFLOP/s")
    ks = [int(k) for k in args.ks.split(",")]
    header = "| D | k | method | s / example | roofline | note |"
    print(header)
    print("|---:|---:|---|---:|---:|---|")
    for log2_d in (int(x) for x in args.log2_dims.split(",")):
        d = 2**log2_d
        shape = (d // HIDDEN, HIDDEN)
        grads = make_grads(d, args.batch, args.tokens, device)
        d_used = grads[0].numel()
        for k in ks:
            for proj_type in TYPES:
                if proj_type == "normal" and k > 2**25:
                    continue
                seconds, note = time_ours(proj_type, shape, grads, k, args.max_entries, device)
                print_row(d_used, k, proj_type, seconds, args.batch, rate, note, args.json)
            for proj_type in ("rademacher", "normal"):
                if not args.trak:
                    continue
                seconds, note = time_trak(proj_type, grads, k, device)
                print_row(
                    d_used, k, f"trak-{proj_type[:3]}", seconds, args.batch, rate, note, args.json
                )
        del grads
    roofline_point(args, rate)


def roofline_point(args, rate) -> None:
    """Dense rademacher at the roofline batch, D = 2**20 (all rows), k = 8192."""
    d, k, batch = 2**args.roofline_log2_dim, 8192, args.roofline_batch
    grads = make_grads(d, batch, args.tokens, args.device)
    d_used = grads[0].numel()
    seconds, note = time_ours(
        "rademacher", (d // HIDDEN, HIDDEN), grads, k, args.max_entries, args.device
    )
    print(f"roofline at batch {batch}:")
    print_row(d_used, k, "rademacher", seconds, batch, rate, note)


if __name__ == "__main__":
    main()
