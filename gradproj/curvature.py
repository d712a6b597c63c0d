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
# One block (a k x k Gram and its eigenvectors, fp64) at most this wide: 2 x 512 MiB.
MAX_BLOCK_DIM = 8192
# Train vectors summed per step: fixed, so that the sums' rounding is that of the run alone.
SUM_BYTES = 1 << 26


@dataclass(frozen=True)
class Block:
    """A range of vector coordinates preconditioned together: a module, or the whole vector."""

    name: str
    start: int
    end: int

    @property
    def k(self) -> int:
        return self.end - self.start


def vector_blocks(manifest: dict, width: int) -> list[Block]:
    """One block per module of a params kronecker run (its manifest `slice`), else one."""
    modules = manifest.get("modules") or []
    if modules and all("slice" in m for m in modules) and manifest.get("kind") == "projected":
        blocks = [Block(m["name"], *m["slice"]) for m in modules]
        if blocks[-1].end == width:
            return blocks
    return [Block("all", 0, width)]


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


def check_supported(run: store.Run) -> list[Block]:
    """The run's blocks, or a UserError saying why it cannot be preconditioned."""
    ragged, _, width = run.stored_rows()
    if ragged:
        raise UserError(
            f"--precondition needs projected vectors, but {run.path} stores full (ragged) "
            "embedding gradients; precondition a projected run"
        )
    blocks = vector_blocks(run.manifest, width)
    widest = max(blocks, key=lambda b: b.k)
    if widest.k > MAX_BLOCK_DIM:
        need = 2 * widest.k**2 * 8 / 2**30
        raise UserError(
            f"--precondition gram on {run.path}: one block of {widest.k:,} coordinates needs "
            f"{need:.1f} GiB (its Gram and eigenvectors in fp64), above the limit of "
            f"{MAX_BLOCK_DIM:,} coordinates; use a smaller --proj_dim or the params target, "
            "whose modules are preconditioned block by block"
        )
    return blocks


@dataclass
class Curvature:
    """A train run's factorization: per block, eigenvalues (ascending) and eigenvectors."""

    kind: str
    blocks: list[Block]
    eigenvalues: list[torch.Tensor]
    eigenvectors: list[torch.Tensor]
    info: dict  # run_fields of the train run, n_vectors, ...

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * 8 for v in self.eigenvectors)


def compute_gram(run: store.Run, device: str) -> Curvature:
    """Each block's `Phi^T Phi / n` in fp64, streamed through the run; then its eigh."""
    blocks = check_supported(run)
    grams = [torch.zeros(b.k, b.k, dtype=COMPUTE, device=device) for b in blocks]
    n = 0
    for shard in store.iter_blocks(run, SUM_BYTES):
        vectors = shard.vectors.to(device).to(COMPUTE)
        n += len(vectors)
        for gram, block in zip(grams, blocks, strict=True):
            part = vectors[:, block.start : block.end]
            gram += part.T @ part
    values, vectors = [], []
    for gram in grams:
        s, v = torch.linalg.eigh(gram / n)
        values.append(s.clamp_min(0).cpu())  # rounding can make a null direction negative
        vectors.append(v.cpu().contiguous())  # as stored: one layout, one rounding
    info = {"n_vectors": n, "run": str(run.path.resolve()), "fields": run_fields(run)}
    return Curvature("gram", blocks, values, vectors, info)


# --- The file ---


def save(curvature: Curvature, path: Path) -> None:
    tensors = {}
    for i, (s, v) in enumerate(zip(curvature.eigenvalues, curvature.eigenvectors, strict=True)):
        tensors[f"block{i}.eigenvalues"] = s.contiguous()
        tensors[f"block{i}.eigenvectors"] = v.contiguous()
    info = {
        "format": CURVATURE_FORMAT,
        "kind": curvature.kind,
        "blocks": [[b.name, b.start, b.end] for b in curvature.blocks],
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
    blocks = [Block(name, start, end) for name, start, end in info.pop("blocks")]
    n = len(blocks)
    return Curvature(
        info.pop("kind"),
        blocks,
        [tensors[f"block{i}.eigenvalues"] for i in range(n)],
        [tensors[f"block{i}.eigenvectors"] for i in range(n)],
        {k: v for k, v in info.items() if k != "format"},
    )


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


def damping_values(curvature: Curvature, damping: float) -> list[float]:
    """Each block's lambda: `damping` times its mean eigenvalue (a block of zeros: `damping`)."""
    means = [float(s.mean()) if len(s) else 0.0 for s in curvature.eigenvalues]
    return [damping * mean if mean > 0 else damping for mean in means]


class Whitener:
    """`x -> x (G + lambda I)^-1/2` block by block, for fp64 `[n, k]` vectors on one device;
    callable on any number of vectors (a single test vector too)."""

    def __init__(self, curvature: Curvature, damping: float, device: str):
        self.blocks = curvature.blocks
        self.lambdas = damping_values(curvature, damping)
        self.matrices = []
        for s, v, lam in zip(
            curvature.eigenvalues, curvature.eigenvectors, self.lambdas, strict=True
        ):
            v = v.to(device, COMPUTE)
            scale = (s.to(device, COMPUTE) + lam).rsqrt()
            self.matrices.append((v * scale) @ v.T)

    @property
    def width(self) -> int:
        return self.blocks[-1].end

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        if vectors.shape[-1] != self.width:
            raise UserError(
                f"vectors of {vectors.shape[-1]} coordinates, but the curvature file covers "
                f"{self.width}; use the factorization of a run with the same projection"
            )
        out = torch.empty_like(vectors)
        for block, matrix in zip(self.blocks, self.matrices, strict=True):
            out[:, block.start : block.end] = vectors[:, block.start : block.end] @ matrix
        return out
