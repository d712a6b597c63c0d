"""Curvature of a train run's projected gradients, for preconditioned influence scores.

`gram`: per block of coordinates (one block per module of a params kronecker run, whose vectors
are the modules' `k_out x k_in` blocks side by side; one block of the whole vector otherwise), the
train set's second moment `G = Phi^T Phi / n` (Phi: the run's stored vectors, every stored
example), kept as its eigendecomposition `G = V diag(s) V^T`. Scoring whitens both sides by
`W = (G + lambda I)^-1/2 = V diag((s + lambda)^-1/2) V^T`, with `lambda = damping * mean(s)`
(the block's mean eigenvalue, trace(G) / k): whitened vectors have the dot product
`g_test^T (G + lambda I)^-1 g_train` and, normalised, TrackStar's cosine (whiten, then
normalise).

The eigendecomposition does not depend on the damping, so one factorization per train run serves
every damping. It is computed once and stored (docs/formats.md, "Curvature file"); a later
scoring reads it back after checking that it belongs to the train run it scores. The sums are
taken in fixed blocks of the run's own shards and in fp64, so the file's bytes do not depend on
the memory budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from gradproj import store
from gradproj.errors import UserError

CURVATURE_FORMAT = "gradproj-curvature/1"
KINDS = ("gram",)
COMPUTE = torch.float64
DEFAULT_DAMPING = 1.0  # lambda = 1 x the block's mean eigenvalue
# Largest rank of one block's factorization (its k x r eigenvectors and the Gram or kernel
# whose eigh gives them, fp64): 2 x 512 MiB for a block of 8192 coordinates.
MAX_RANK = 8192
# Kernel eigenvalues below this fraction of a block's largest count as zero.
RELATIVE_NULL = 1e-12
# Train vectors summed per step: fixed, so that the sums' rounding is that of the run alone.
SUM_BYTES = 1 << 26


@dataclass(frozen=True)
class Blocks:
    """The vector's coordinates in `count` consecutive blocks of `k`: one per module of a params
    kronecker run (whose modules all have `k_out x k_in` coordinates), or one of the whole."""

    names: tuple[str, ...]
    k: int

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def width(self) -> int:
        return self.count * self.k


def vector_blocks(manifest: dict, width: int) -> Blocks:
    modules = manifest.get("modules") or []
    if manifest.get("kind") == "projected" and modules and all("slice" in m for m in modules):
        k = modules[0]["slice"][1]
        if all(m["slice"] == [i * k, (i + 1) * k] for i, m in enumerate(modules)):
            if len(modules) * k == width:
                return Blocks(tuple(m["name"] for m in modules), k)
    return Blocks(("all",), width)


def run_fields(run: store.Run) -> dict:
    """What a factorization must share with the train run it preconditions."""
    manifest, projection = run.manifest, run.manifest.get("projection") or {}
    return {
        "model": manifest.get("model"),
        "checkpoint": manifest.get("checkpoint"),
        "target": manifest.get("target"),
        "dataset": manifest.get("dataset"),
        "split": manifest.get("split"),
        "projection type": projection.get("type", "full"),
        "projection dim": projection.get("dim"),
        "projection seed": projection.get("seed"),
        "modules": [m["name"] for m in manifest.get("modules") or []],
        "examples": len(manifest.get("examples") or []),
        "train manifest sha256": store.file_sha256(run.path / store.MANIFEST),
    }


def check_supported(run: store.Run) -> Blocks:
    """The run's blocks, or a UserError saying why it cannot be preconditioned."""
    ragged, _, width = run.stored_rows()
    if ragged:
        raise UserError(
            f"--precondition needs projected vectors, but {run.path} stores full (ragged) "
            "embedding gradients; precondition a projected run"
        )
    blocks = vector_blocks(run.manifest, width)
    rank = min(blocks.k, len(run.ids))
    if rank > MAX_RANK:
        need = 2 * blocks.count * rank**2 * 8 / 2**30
        raise UserError(
            f"--precondition gram on {run.path}: blocks of {blocks.k:,} coordinates over "
            f"{len(run.ids):,} examples have rank up to {rank:,}, and their factorization needs "
            f"{need:.1f} GiB in fp64, above the limit of rank {MAX_RANK:,}; use a smaller "
            "--proj_dim or the params target, whose modules are preconditioned block by block"
        )
    return blocks


def factorization_bytes(run: store.Run) -> int:
    """The fp64 eigenvectors' bytes of the run's factorization, `count x k x min(k, n)`."""
    blocks = check_supported(run)
    return blocks.count * blocks.k * min(blocks.k, len(run.ids)) * 8


@dataclass
class Curvature:
    """A train run's factorization: `[count, r]` eigenvalues and `[count, k, r]` eigenvectors
    (r = k, or the number of examples when it is smaller: the other eigenvalues are 0)."""

    kind: str
    blocks: Blocks
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    info: dict  # run_fields of the train run, n_vectors, ...


def compute_gram(run: store.Run, device: str) -> Curvature:
    """Each block's `G = Phi^T Phi / n` in fp64, by the smaller of two exact routes: the
    `k x k` Gram streamed through the run, or, with fewer examples than k, the `n x n` kernel
    `Phi Phi^T / n`, whose eigenvectors U give G's as `Phi^T U / sqrt(n s)`."""
    blocks = check_supported(run)
    n = len(run.ids)
    if n < blocks.k:
        values, vectors = _kernel_eigh(run, blocks, device)
    else:
        values, vectors = _gram_eigh(run, blocks, device)
    info = {"n_vectors": n, "run": str(run.path.resolve()), "fields": run_fields(run)}
    # as stored: one memory layout, hence one rounding, whether computed or read back
    return Curvature("gram", blocks, values.cpu(), vectors.cpu().contiguous(), info)


def _stored_vectors(run: store.Run, blocks: Blocks, device: str):
    for shard in store.iter_blocks(run, SUM_BYTES):
        yield shard.vectors.to(device).to(COMPUTE).reshape(-1, blocks.count, blocks.k)


def _gram_eigh(run: store.Run, blocks: Blocks, device: str):
    gram = torch.zeros(blocks.count, blocks.k, blocks.k, dtype=COMPUTE, device=device)
    for phi in _stored_vectors(run, blocks, device):
        gram += torch.einsum("nbi,nbj->bij", phi, phi)
    values, vectors = torch.linalg.eigh(gram / len(run.ids))
    return values.clamp_min(0), vectors  # rounding can make a null direction negative


def _kernel_eigh(run: store.Run, blocks: Blocks, device: str):
    phi = torch.cat(list(_stored_vectors(run, blocks, device)))  # n < k: smaller than G
    n = len(phi)
    values, u = torch.linalg.eigh(torch.einsum("ibk,jbk->bij", phi, phi) / n)
    # directions of (near) zero eigenvalue are left to the damping: their vectors are dropped
    kept = values > values[:, -1:] * RELATIVE_NULL
    values = torch.where(kept, values, 0.0)
    scale = torch.where(kept, (n * values).clamp_min(1e-300).rsqrt(), 0.0)
    vectors = torch.einsum("ibk,bir->bkr", phi, u) * scale[:, None, :]
    return values, vectors


# --- The file ---


def save(curvature: Curvature, path: Path) -> None:
    tensors = {"eigenvalues": curvature.eigenvalues, "eigenvectors": curvature.eigenvectors}
    info = {
        "format": CURVATURE_FORMAT,
        "kind": curvature.kind,
        "modules": list(curvature.blocks.names),
        "block_dim": curvature.blocks.k,
        **curvature.info,
    }
    store.write_safetensors(tensors, path, info)


def load(path: Path) -> Curvature:
    try:
        with safe_open(str(path), framework="pt") as f:
            info = store.read_metadata(f)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:
        raise UserError(f"--curvature {path} is not a curvature file ({err}); delete it") from None
    if info.get("format") != CURVATURE_FORMAT:
        raise UserError(
            f"--curvature {path} has format {info.get('format')!r}, not {CURVATURE_FORMAT}; "
            "delete it to recompute it"
        )
    blocks = Blocks(tuple(info.pop("modules")), info.pop("block_dim"))
    kind = info.pop("kind")
    info.pop("format")
    return Curvature(kind, blocks, tensors["eigenvalues"], tensors["eigenvectors"], info)


def check_belongs(curvature: Curvature, kind: str, run: store.Run, path: Path) -> None:
    """Refuse a factorization of another kind or another run, naming what differs."""
    if curvature.kind != kind:
        raise UserError(
            f"--curvature {path} holds a {curvature.kind!r} factorization, not {kind!r}; "
            "give another --curvature path"
        )
    ours, theirs = run_fields(run), curvature.info.get("fields", {})
    differ = [f"{k} ({theirs.get(k)!r} vs {ours[k]!r})" for k in ours if theirs.get(k) != ours[k]]
    if differ:
        raise UserError(
            f"--curvature {path} was computed from another train run ({curvature.info.get('run')})"
            f": it differs from {run.path} in {'; '.join(differ)}; give the train run's own "
            "--curvature file, or a new path to compute it"
        )


def load_or_compute(kind: str, run: store.Run, path: Path, device: str) -> Curvature:
    """The stored factorization of `run` at `path`, checked; else computed and stored there."""
    check_supported(run)
    if path.is_file():
        curvature = load(path)
        check_belongs(curvature, kind, run, path)
        return curvature
    check_writable(path)
    curvature = compute_gram(run, device)
    save(curvature, path)
    return curvature


def check_writable(path: Path) -> None:
    """Fail before computing when the factorization could not be stored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.probe"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cannot write the curvature file {path} ({err.strerror}); choose a writable "
            "--curvature path"
        ) from None


def default_path(train_run: Path, kind: str) -> Path:
    return Path(train_run) / "curvature" / f"{kind}.safetensors"


# --- Applying it ---


def damping_values(curvature: Curvature, damping: float) -> torch.Tensor:
    """Each block's lambda: `damping` times its mean eigenvalue, trace(G) / k (a block of
    zeros: `damping`)."""
    means = curvature.eigenvalues.sum(1) / curvature.blocks.k
    return torch.where(means > 0, damping * means, damping)


class Whitener:
    """`x -> x (G + lambda I)^-1/2` block by block, for fp64 `[n, width]` vectors on one device;
    callable on any number of vectors (a single test vector too).

    With G's eigenpairs (s, V) and the complement of V's columns (eigenvalue 0),
    `(G + lambda I)^-1/2 = lambda^-1/2 I + V diag((s + lambda)^-1/2 - lambda^-1/2) V^T`:
    `2 k r` operations a block, r the factorization's rank.
    """

    def __init__(self, curvature: Curvature, damping: float, device: str):
        self.blocks = curvature.blocks
        lambdas = damping_values(curvature, damping).to(device, COMPUTE)
        self.base = lambdas.rsqrt()[None, :, None]  # [1, count, 1]
        values = curvature.eigenvalues.to(device, COMPUTE)
        self.correction = (values + lambdas[:, None]).rsqrt() - lambdas.rsqrt()[:, None]
        self.vectors = curvature.eigenvectors.to(device, COMPUTE)
        self.lambdas = lambdas

    @property
    def nbytes(self) -> int:
        return self.vectors.numel() * 8

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        if vectors.shape[-1] != self.blocks.width:
            raise UserError(
                f"vectors of {vectors.shape[-1]} coordinates, but the curvature file covers "
                f"{self.blocks.width}; use the factorization of a run with the same projection"
            )
        x = vectors.reshape(len(vectors), self.blocks.count, self.blocks.k)
        coefficients = torch.einsum("nbk,bkr->nbr", x, self.vectors) * self.correction
        out = x * self.base + torch.einsum("nbr,bkr->nbk", coefficients, self.vectors)
        return out.reshape(vectors.shape)
