"""Projection engine: each test checks one property against an independent reference."""

import functools
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.stats
import torch

from gradproj import projection as proj
from gradproj.errors import UserError
from gradproj.projection import (
    RademacherProjection,
    generator,
    kronecker,
    make_projection,
    parse_kronecker_dim,
    random_block,
    sjlt,
)

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
MC_SEEDS = 2000
MC_SHAPE = (6, 8)
MC_K = 16


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fp64_projection(grads, kind, seed, shape, k):
    """Brute force: each zero-padded, flattened gradient times the explicit matrix, in fp64."""
    matrix = random_block(kind, seed, 0, 0, shape[0] * shape[1], 0, k).double()
    rows = []
    for grad in grads:
        flat = torch.zeros(shape[0] * shape[1], dtype=torch.float64)
        flat[: grad.numel()] = grad.double().reshape(-1)
        rows.append(flat @ matrix / math.sqrt(k))
    return torch.stack(rows)


def _ragged_grads(shape, lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(length, shape[1], generator=generator) for length in lengths]


def _close_to_fp32_rounding(actual, expected, grads):
    # An fp32 sum of n terms is off by at most ~n * eps * sum|terms|; bound by norms.
    scale = max(float(torch.stack([g.double().norm() for g in grads]).max()), 1e-30)
    error = (actual.double() - expected.double()).abs().max().item()
    return error <= 1e-5 * scale


# ---------------------------------------------------------------- generator


def test_counter_hash_matches_python_reference_beyond_32_bit_rows():
    key = proj.stream_key("rademacher", 42, 3)
    row0, word0 = (1 << 33) + 5, 7
    hashed = proj.counter_hash(key, row0, row0 + 3, word0, word0 + 4, "cpu")
    expected = [
        [_signed(proj.counter_hash_reference(key, row0 + r, word0 + w)) for w in range(4)]
        for r in range(3)
    ]
    assert hashed.tolist() == expected


def test_rademacher_entry_is_bit_of_its_hash_word():
    seed, stream, row0, col0 = 7, 2, (1 << 35) + 1000, 100
    block = random_block("rademacher", seed, stream, row0, row0 + 3, col0, col0 + 150)
    key = proj.stream_key("rademacher", seed, stream)
    expected = [
        [
            1 - 2 * ((proj.counter_hash_reference(key, i, j // 64) >> (j % 64)) & 1)
            for j in range(col0, col0 + 150)
        ]
        for i in range(row0, row0 + 3)
    ]
    assert block.tolist() == expected


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_random_block_is_the_same_for_any_tiling(kind):
    whole = random_block(kind, 5, 1, 3, 40, 1, 300)
    tiles = [
        torch.cat([random_block(kind, 5, 1, r0, r1, c0, c1) for c0, c1 in [(1, 65), (65, 300)]], 1)
        for r0, r1 in [(3, 20), (20, 21), (21, 40)]
    ]
    assert torch.equal(torch.cat(tiles), whole)


def test_normal_entries_follow_standard_normal():
    sample = random_block("normal", 11, 0, 0, 200, 0, 1000).double().reshape(-1).numpy()
    assert scipy.stats.kstest(sample, "norm").pvalue > 1e-3


def _box_muller_fp64(key: int, row: int, column: int) -> float:
    """Entry (row, column) of a normal matrix in fp64 from its hash word, by plain Python math."""
    word = proj.counter_hash_reference(key, row, column // 2)
    u1 = ((word >> 41) * 2 + 1) * 2.0**-24
    theta = (word & (2**24 - 1)) * 2 * math.pi * 2.0**-24
    trig = math.cos if column % 2 == 0 else math.sin
    return math.sqrt(-2 * math.log(u1)) * trig(theta)


def test_normal_entry_is_box_muller_of_its_hash_word():
    seed, stream, row0, col0 = 4, 1, (1 << 35) + 999, 37
    block = random_block("normal", seed, stream, row0, row0 + 40, col0, col0 + 60).double()
    key = proj.stream_key("normal", seed, stream)
    expected = torch.tensor(
        [
            [_box_muller_fp64(key, i, j) for j in range(col0, col0 + 60)]
            for i in range(row0, row0 + 40)
        ]
    )
    # fp32 rounding of values up to ~5.6, plus the polynomials' 2e-7.
    assert (block - expected).abs().max() < 2e-6


def test_cos_sin_of_turns_matches_fp64_over_every_quarter():
    turns = torch.arange(0, 1 << 24, 4099, dtype=torch.int32)
    turns = torch.cat([turns, torch.tensor([0, 1 << 21, 1 << 22, 3 << 21, (1 << 24) - 1])])
    cos, sin = generator._cos_sin_of_turns(turns)
    theta = turns.double() * 2 * math.pi / 2**24
    assert (cos.double() - torch.cos(theta)).abs().max() < 2e-7
    assert (sin.double() - torch.sin(theta)).abs().max() < 2e-7


@pytest.mark.parametrize("kind, fused", [("rademacher", "_signs"), ("normal", "_box_muller")])
def test_random_block_is_generated_by_a_compiled_kernel(kind, fused):
    random_block(kind, 8, 0, 0, 4, 0, 64)
    assert getattr(generator, fused).kernel is not getattr(generator, fused).function


@pytest.mark.parametrize("kind, fused", [("rademacher", "_signs"), ("normal", "_box_muller")])
def test_random_block_without_compiler_agrees_and_warns(kind, fused, monkeypatch, capsys):
    compiled = random_block(kind, 8, 0, 3, 64, 5, 200)

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(getattr(generator, fused), "kernel", broken)
    unfused = random_block(kind, 8, 0, 3, 64, 5, 200)
    assert "no C++ compiler" in capsys.readouterr().err
    assert getattr(generator, fused).kernel is getattr(generator, fused).function
    # Signs are exact either way; normals agree to fp32 rounding of values up to ~5.6.
    assert (unfused - compiled).abs().max() <= (0 if kind == "rademacher" else 2e-6)


def test_rademacher_signs_are_balanced_and_independent_of_neighbours():
    signs = random_block("rademacher", 3, 0, 0, 256, 0, 4096).double()
    n = signs.numel()
    # Mean and lag-1 correlation along rows and columns: each ~N(0, 1/n) for fair coins.
    stats = [signs.mean(), (signs[:, 1:] * signs[:, :-1]).mean(), (signs[1:] * signs[:-1]).mean()]
    assert all(abs(float(s)) < 5 / math.sqrt(n) for s in stats)


def test_streams_and_kinds_give_unrelated_matrices():
    blocks = [
        random_block("rademacher", 1, 0, 0, 64, 0, 1024),
        random_block("rademacher", 1, 1, 0, 64, 0, 1024),
        random_block("rademacher", 2, 0, 0, 64, 0, 1024),
        random_block("normal", 1, 0, 0, 64, 0, 1024).sign(),
    ]
    n = blocks[0].numel()
    correlations = [float((a * b).mean()) for i, a in enumerate(blocks) for b in blocks[i + 1 :]]
    assert all(abs(c) < 5 / math.sqrt(n) for c in correlations)


# ---------------------------------------------------------------- dense projection


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_dense_projection_matches_fp64_brute_force(kind):
    shape, k = (5, 48), 200
    grads = _ragged_grads(shape, [5, 2, 0, 4])
    out = make_projection(kind, [k], 9, shape).project_batch(grads)[k]
    assert _close_to_fp32_rounding(out, _fp64_projection(grads, kind, 9, shape, k), grads)


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_dense_projection_is_the_same_for_any_block_shape(kind):
    shape, k = (7, 40), 300
    grads = _ragged_grads(shape, [7, 3, 6])
    default = make_projection(kind, [k], 1, shape).project_batch(grads)[k]
    small = make_projection(kind, [k], 1, shape)
    small.block_rows, small.block_cols = 13, 64
    assert _close_to_fp32_rounding(small.project_batch(grads)[k], default, grads)


def test_bf16_sign_product_path_equals_fp32_product(monkeypatch):
    """The CUDA tensor-core path's logic on CPU: bf16 signs, fp32 split in three bf16 pieces."""
    real_mm = torch.mm

    def mm_with_fp32_output(a, b, out_dtype=None):
        # CPU torch.mm has no out_dtype: bf16 products of +-1 and bf16 pieces are exact in fp32.
        return real_mm(a.float(), b.float()) if out_dtype is not None else real_mm(a, b)

    shape, k = (7, 40), 300
    grads = _ragged_grads(shape, [7, 3, 6])
    fp32 = make_projection("rademacher", [k], 1, shape).project_batch(grads)[k]
    monkeypatch.setattr(torch, "mm", mm_with_fp32_output)
    monkeypatch.setattr(RademacherProjection, "_use_exact_bf16", lambda self: True)
    split = make_projection("rademacher", [k], 1, shape).project_batch(grads)[k]
    assert _close_to_fp32_rounding(split, fp32, grads)


@pytest.mark.parametrize("proj_type", proj.PROJ_TYPES)
def test_projection_is_the_same_for_any_batch_size(proj_type):
    shape, k = (6, 32), 64
    grads = _ragged_grads(shape, [6, 1, 4])
    projector = make_projection(proj_type, [k], 4, shape)
    together = projector.project_batch(grads)[k]
    alone = torch.cat([projector.project_batch([g])[k] for g in grads])
    assert _close_to_fp32_rounding(together, alone, grads)


@pytest.mark.parametrize("proj_type", proj.PROJ_TYPES)
def test_low_precision_inputs_project_as_their_fp32_values(proj_type):
    shape, k = (4, 32), 64
    grads = _ragged_grads(shape, [4, 2])
    projector = make_projection(proj_type, [k], 2, shape)
    for dtype in (torch.bfloat16, torch.float16):
        low = [g.to(dtype) for g in grads]
        upcast = [g.float() for g in low]
        assert torch.equal(projector.project_batch(low)[k], projector.project_batch(upcast)[k])


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_prefix_of_wide_projection_is_narrow_projection_rescaled(kind):
    shape = (3, 50)
    grads = _ragged_grads(shape, [3, 2])
    both = make_projection(kind, [8, 100], 6, shape).project_batch(grads)
    narrow = make_projection(kind, [8], 6, shape).project_batch(grads)[8]
    # The same matrix entries; the fp32 sums of 150 products may round otherwise in a wider
    # matmul (1.5e-6 relative on an AVX512 CPU): the bound is fp32 summation, not bits.
    assert torch.allclose(both[8], narrow, rtol=1e-5, atol=0)
    assert torch.allclose(both[100][:, :8] * math.sqrt(100 / 8), narrow, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("proj_type", proj.PROJ_TYPES)
def test_zero_rows_left_out_give_the_same_result_as_computing_them(proj_type):
    shape, k = (9, 16), 64
    short = _ragged_grads(shape, [3, 5])
    padded = [torch.cat([g, torch.zeros(shape[0] - g.shape[0], shape[1])]) for g in short]
    projector = make_projection(proj_type, [k], 8, shape)
    projector.block_rows = 16
    assert _close_to_fp32_rounding(
        projector.project_batch(short)[k], projector.project_batch(padded)[k], short
    )


# ---------------------------------------------------------------- structured projections


def _explicit_sjlt(shape, k, seed, s):
    """fp64 [D, k] matrix of the sparse JL transform, entry by entry from its hash."""
    d = shape[0] * shape[1]
    buckets, negative = sjlt.sjlt_hash(proj.stream_key("sjlt", seed, 0), 0, d, s, k, "cpu")
    matrix = np.zeros((d, k))
    for i in range(d):
        for copy in range(s):
            matrix[i, buckets[i, copy]] += -1.0 if negative[i, copy] else 1.0
    return matrix / math.sqrt(s)


@pytest.mark.parametrize("s", [1, 3])
def test_sjlt_matches_explicit_sparse_matrix(s):
    shape, k = (4, 10), 16
    grads = _ragged_grads(shape, [4, 1])
    out = make_projection("sjlt", [k], 3, shape, s=s).project_batch(grads)[k]
    matrix = _explicit_sjlt(shape, k, 3, s)
    expected = [np.pad(g.double().reshape(-1).numpy(), (0, 40 - g.numel())) @ matrix for g in grads]
    # Each coordinate already has unit squared norm (s entries of 1/sqrt(s)): no 1/sqrt(k).
    assert _close_to_fp32_rounding(out, torch.tensor(np.stack(expected)), grads)


def test_sjlt_is_the_same_for_any_block_size():
    shape, k = (8, 32), 50
    grads = _ragged_grads(shape, [8, 5, 2])
    default = make_projection("sjlt", [k], 5, shape, s=2).project_batch(grads)[k]
    small = make_projection("sjlt", [k], 5, shape, s=2)
    small.sjlt_block_rows = 7
    # Every output is summed in coordinate order, whatever the blocks: the same bytes.
    assert torch.equal(small.project_batch(grads)[k], default)


def test_sorted_segment_sums_equal_sequential_scatter_add():
    generator = torch.Generator().manual_seed(0)
    bins = torch.randint(0, 9, (200,), generator=generator)
    values = torch.randn(3, 200, generator=generator)
    expected = torch.zeros(3, 12, dtype=torch.float64).scatter_add_(
        1, bins.expand(3, -1), values.double()
    )
    sums = sjlt.sorted_segment_sums(bins, values, 12)
    assert sums.shape == (3, 12)
    assert torch.allclose(sums.double(), expected, rtol=0, atol=1e-5)


def test_kronecker_matches_explicit_kronecker_product_matrix():
    shape, spec = (5, 6), "2x3"
    grads = _ragged_grads(shape, [5, 3])
    projection = make_projection("kronecker", [spec], 12, shape)
    out = projection.project_batch(grads)[6]
    left, right = (factor.double().numpy() for factor in projection.factor_matrices(2, 3))
    matrix = np.kron(left, right)  # row-major vec(A^T G B) = kron(A, B)^T vec(G)
    expected = [np.pad(g.double().reshape(-1).numpy(), (0, 30 - g.numel())) @ matrix for g in grads]
    assert _close_to_fp32_rounding(out, torch.tensor(np.stack(expected)) / math.sqrt(6), grads)


def test_parse_kronecker_dim_picks_most_balanced_factorization():
    for k in (1, 7, 256, 1000, 2048000):
        k1, k2 = parse_kronecker_dim(k)
        divisors = [d for d in range(1, k + 1) if k % d == 0]
        best = min(abs(math.log(d / (k // d))) for d in divisors)
        assert k1 * k2 == k and k1 <= k2 and math.isclose(abs(math.log(k1 / k2)), best)
    assert parse_kronecker_dim("16x32") == (16, 32)


def test_kronecker_factorization_respects_the_shape():
    projector = make_projection("kronecker", [64], 0, (4, 100))
    assert projector.factors[64] == (4, 16)


@pytest.mark.parametrize(
    "proj_type, dims, shape",
    [
        ("rademacher", [0], (4, 4)),
        ("rademacher", ["abc"], (4, 4)),
        ("fastfood", [8], (4, 4)),
        ("kronecker", [13], (4, 4)),
        ("kronecker", ["8x1"], (4, 4)),
    ],
)
def test_bad_arguments_raise_user_error(proj_type, dims, shape):
    with pytest.raises(UserError):
        make_projection(proj_type, dims, 0, shape)


def test_output_larger_than_budget_raises_user_error():
    projector = make_projection("rademacher", [1 << 20], 0, (2, 2), memory_gb=0.001)
    with pytest.raises(UserError):
        projector.project_batch([torch.ones(2, 2)])


# ---------------------------------------------------------------- statistics over seeds


def _mc_pair():
    """Two correlated ragged gradients of shape MC_SHAPE: a has 6 rows, b has 4."""
    a, noise = _ragged_grads(MC_SHAPE, [6, 4], seed=123)
    return a, 0.6 * a[:4] + noise


@functools.cache
def _mc_estimates(proj_type: str, s: int = 1) -> np.ndarray:
    """[MC_SEEDS, 3]: <Pa, Pb>, ||Pa||^2, ||Pb||^2 over seeds."""
    a, b = _mc_pair()
    options = {"s": s} if proj_type == "sjlt" else {}
    rows = []
    for seed in range(MC_SEEDS):
        projection = make_projection(proj_type, [MC_K], seed, MC_SHAPE, **options)
        out = projection.project_batch([a, b])[MC_K]
        pa, pb = out.double()
        rows.append([float(pa @ pb), float(pa @ pa), float(pb @ pb)])
    return np.array(rows)


def _padded(grad):
    return torch.cat([grad, torch.zeros(MC_SHAPE[0] - grad.shape[0], MC_SHAPE[1])]).double()


def _theoretical_variance(proj_type: str, s: int = 1) -> float:
    """Var <Pa, Pb> at k = MC_K from the closed forms in docs/projection.md."""
    x, y = (_padded(g) for g in _mc_pair())
    norms, dot = float((x * x).sum() * (y * y).sum()), float((x * y).sum())
    diagonal = float((x * x * y * y).sum())
    if proj_type == "normal":
        return (norms + dot**2) / MC_K
    if proj_type in ("rademacher", "sjlt"):
        return (norms + dot**2 - 2 / s * diagonal) / MC_K
    k1, k2 = kronecker._fitting_factors(MC_K, *MC_SHAPE)
    n = y.T @ x
    outer = float(((x @ y.T) ** 2).sum())
    n_frob, n_trace2 = float((n * n).sum()), float(torch.trace(n @ n))
    given_right = ((k2 + 1) / k2) * outer + norms / k2 + n_trace2 + (n_frob + dot**2) / k2
    return given_right / k1 + (n_frob + n_trace2) / k2


# normal and kronecker take 20-30 s each on 2 cores: slow, so the fast subset keeps the other three
MC_CASES = [
    ("rademacher", 1),
    pytest.param("normal", 1, marks=pytest.mark.slow),
    ("sjlt", 1),
    ("sjlt", 4),
    pytest.param("kronecker", 1, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("proj_type, s", MC_CASES)
def test_inner_products_are_unbiased(proj_type, s):
    a, b = _mc_pair()
    true_dot = float((a[:4].double() * b.double()).sum())
    estimates = _mc_estimates(proj_type, s)[:, 0]
    standard_error = estimates.std(ddof=1) / math.sqrt(len(estimates))
    assert abs(estimates.mean() - true_dot) < 3 * standard_error


@pytest.mark.parametrize("proj_type, s", MC_CASES)
def test_squared_norm_ratio_averages_to_one(proj_type, s):
    a, _ = _mc_pair()
    ratios = _mc_estimates(proj_type, s)[:, 1] / float(a.double().pow(2).sum())
    standard_error = ratios.std(ddof=1) / math.sqrt(len(ratios))
    assert abs(ratios.mean() - 1) < 3 * standard_error


@pytest.mark.parametrize("proj_type, s", MC_CASES)
def test_inner_product_variance_matches_closed_form(proj_type, s):
    estimates = _mc_estimates(proj_type, s)[:, 0]
    deviations = (estimates - estimates.mean()) ** 2
    standard_error = deviations.std(ddof=1) / math.sqrt(len(deviations))
    assert abs(deviations.mean() - _theoretical_variance(proj_type, s)) < 4 * standard_error


def test_kronecker_variance_exceeds_dense_on_rank_one_gradients():
    # Rank-one gradients are the worst case of A^T G B: k1 and k2 act separately.
    u, v = torch.randn(MC_SHAPE[0], 1), torch.randn(1, MC_SHAPE[1])
    grads, seeds = [u @ v, 2 * u @ v], range(300)
    dense, kron = [], []
    for seed in seeds:
        for name, store in (("rademacher", dense), ("kronecker", kron)):
            pa, pb = (
                make_projection(name, [MC_K], seed, MC_SHAPE).project_batch(grads)[MC_K].double()
            )
            store.append(float(pa @ pb))
    ratio = np.var(kron) / np.var(dense)
    interval = scipy.stats.f.ppf([0.001, 0.999], len(kron) - 1, len(dense) - 1)
    assert ratio > interval[1]


@pytest.mark.parametrize("proj_type", ["rademacher", "normal", "sjlt"])
def test_relative_error_shrinks_like_inverse_square_root_of_k(proj_type):
    dims = [256 * 2**i for i in range(7)]  # 256 ... 16384
    shape = (4, 256)
    grads = _ragged_grads(shape, [4, 4, 3, 4, 2, 3], seed=5)
    flat = [g.double().reshape(-1) for g in grads]
    pairs = [(i, j) for i in range(len(grads)) for j in range(i + 1, len(grads))]
    errors = {k: [] for k in dims}
    for seed in range(4):
        out = make_projection(proj_type, dims, seed, shape).project_batch(grads)
        for k in dims:
            for i, j in pairs:
                true = float(flat[i][: flat[j].numel()] @ flat[j][: flat[i].numel()])
                norms = float(flat[i].norm() * flat[j].norm())
                errors[k].append((float(out[k][i].double() @ out[k][j].double()) - true) / norms)
    rms = [math.sqrt(np.mean(np.square(errors[k]))) for k in dims]
    slope = np.polyfit(np.log(dims), np.log(rms), 1)[0]
    assert -0.6 < slope < -0.4


# ---------------------------------------------------------------- memory and devices

MEMORY_BUDGET_GB = 1 / 16
MEMORY_SCRIPT = textwrap.dedent(
    """
    import threading, time, torch
    from gradproj.projection import make_projection
    # Anonymous memory only: pages of shared libraries (BLAS code paths) are not allocations.
    def anon_gib():
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("RssAnon:"))
        return int(line.split()[1]) / 2**20
    peak, done = [0.0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_gib())
            time.sleep(0.0005)
    grad = torch.randn(1, 256)  # one non-zero row of a [65536, 256] gradient: D = 2**24
    # 256 rows x 2**17 columns of the matrix alone would be 128 MiB, twice the budget.
    projector = make_projection("rademacher", [2**17], 0, (65536, 256), memory_gb=BUDGET)
    # Warm up thread pools and BLAS buffers on one block of the same shape.
    make_projection("rademacher", [4096], 0, (65536, 256)).project_batch([grad])
    before = anon_gib()
    sampler = threading.Thread(target=sample)
    sampler.start()
    projector.project_batch([grad])
    done.set()
    sampler.join()
    print(peak[0] - before)
    """
).replace("BUDGET", str(MEMORY_BUDGET_GB))


@pytest.mark.slow
def test_projecting_2_24_to_2_17_stays_under_memory_budget():
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert float(result.stdout.strip()) < MEMORY_BUDGET_GB


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_random_block_on_cuda_matches_cpu(kind):
    cpu = random_block(kind, 3, 1, 5, 300, 7, 5000)
    cuda = random_block(kind, 3, 1, 5, 300, 7, 5000, device="cuda").cpu()
    if kind == "rademacher":
        assert torch.equal(cpu, cuda)
    else:
        assert torch.allclose(cpu, cuda, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("proj_type", proj.PROJ_TYPES)
def test_projection_on_cuda_matches_cpu(proj_type):
    shape, k = (64, 96), 1024
    grads = _ragged_grads(shape, [64, 10, 33])
    cpu = make_projection(proj_type, [k], 2, shape).project_batch(grads)[k]
    cuda = make_projection(proj_type, [k], 2, shape, device="cuda").project_batch(
        [g.cuda() for g in grads]
    )[k]
    assert _close_to_fp32_rounding(cuda, cpu, grads)
