"""Curvature of a train run's projected gradients, for preconditioned influence scores.

`gram`: per block of coordinates (one block per module of a params kronecker run, whose vectors
are the modules' `k_out x k_in` blocks side by side; one block of the whole vector otherwise), the
train set's second moment `G = Phi^T Phi / n` (Phi: the run's stored vectors, every stored
example), kept as its eigendecomposition `G = V diag(s) V^T`. Scoring whitens both sides by
`W = (G + lambda I)^-1/2 = V diag((s + lambda)^-1/2) V^T`, with `lambda = damping * mean(s)`
(the block's mean eigenvalue, trace(G) / k): whitened vectors have the dot product
`g_test^T (G + lambda I)^-1 g_train` and, normalised, TrackStar's cosine (whiten, then
normalise).

`kfac` (params kronecker runs): per module, `S_out (x) S_in` in place of G, the covariances of
the projected output gradients and layer inputs over every token of the run's examples; the
stored vectors do not hold these, so they are collected by reading the model once more
(`gradproj.extract.factors`, the extraction stage: scoring reads stored vectors only), and
whitened exactly through the two factors' eigenbases (`KfacWhitener`).

The eigendecomposition does not depend on the damping, so one factorization per train run serves
every damping. It is computed once and stored (docs/formats.md, "Curvature file"); a later
scoring reads it back after checking that it belongs to the train run it scores. The sums are
taken in fixed blocks of the run's own shards and in fp64, so the file's bytes do not depend on
the memory budget.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from gradproj import fsio, store
from gradproj.errors import UserError

CURVATURE_FORMAT = "gradproj-curvature/2"  # 2: a content checksum; the train shards' hash
KINDS = ("gram", "kfac")
COMPUTE = torch.float64
DEFAULT_DAMPING = 1.0  # lambda = 1 x the block's mean eigenvalue
# The --damping range. Below it lambda is smaller than the rounding error of a large block's
# eigenvalues (1e-16 of the largest, which is up to k times the mean), so the whitening would
# scale noise, and near 1e-300 it overflows; above it the whitening barely changes the ranking
# (every score is about the plain one over lambda: use --precondition none), and near 1e300 the
# scores underflow fp32 to 0.
MIN_DAMPING, MAX_DAMPING = 1e-8, 1e6
# Largest rank of one block's factorization (its k x r eigenvectors and the Gram or kernel
# whose eigh gives them, fp64): 2 x 512 MiB for a block of 8192 coordinates.
MAX_RANK = 8192
# Kernel eigenvalues below this fraction of a block's largest count as zero.
RELATIVE_NULL = 1e-12
# Train vectors summed per step: fixed, so that the sums' rounding is that of the run alone.
SUM_BYTES = 1 << 26


@dataclass(frozen=True)
class BlockLayout:
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


def vector_blocks(manifest: store.Manifest, width: int) -> BlockLayout:
    modules = manifest.modules
    if manifest.kind == "projected" and modules and all("slice" in m for m in modules):
        k = modules[0]["slice"][1]
        if all(m["slice"] == [i * k, (i + 1) * k] for i, m in enumerate(modules)):
            if len(modules) * k == width:
                return BlockLayout(tuple(m["name"] for m in modules), k)
    return BlockLayout(("all",), width)


def run_fields(run: store.Run) -> dict:
    """What a factorization must share with the train run it preconditions."""
    manifest, projection = run.manifest, run.manifest.projection or {}
    return {
        "model": manifest.model,
        "checkpoint": manifest.checkpoint,
        "target": manifest.target,
        "dataset": manifest.dataset,
        "split": manifest.split,
        "projection type": projection.get("type", "full"),
        "projection dim": projection.get("dim"),
        "projection seed": projection.get("seed"),
        "modules": [m["name"] for m in manifest.modules],
        "examples": len(manifest.examples),
        "train shards sha256": store.shards_sha256(manifest),
    }


def check_supported(run: store.Run) -> BlockLayout:
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


def factorization_bytes(run: store.Run, kind: str = "gram") -> int:
    """The fp64 eigenvectors' bytes of the run's factorization: `count x k x min(k, n)` for
    gram, `count x (k_out^2 + k_in^2)` for kfac."""
    blocks = check_supported(run)
    if kind == "kfac":
        k_out, k_in = kronecker_dims(run)
        return blocks.count * (k_out**2 + k_in**2) * 8
    return blocks.count * blocks.k * min(blocks.k, len(run.ids)) * 8


@dataclass
class Curvature:
    """A train run's factorization. gram: `eigenvalues` `[count, r]` and `eigenvectors`
    `[count, k, r]` of each block's G (r = k, or the number of examples when it is smaller: the
    other eigenvalues are 0). kfac: `out_eigenvalues` `[count, k_out]`, `out_eigenvectors`
    `[count, k_out, k_out]` and likewise `in_...` of each module's two factors."""

    kind: str
    blocks: BlockLayout
    tensors: dict[str, torch.Tensor]
    info: dict  # run_fields of the train run, n_vectors, ...

    @property
    def eigenvalues(self) -> torch.Tensor:
        return self.tensors["eigenvalues"]

    @property
    def eigenvectors(self) -> torch.Tensor:
        return self.tensors["eigenvectors"]


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
    tensors = {"eigenvalues": values.cpu(), "eigenvectors": vectors.cpu().contiguous()}
    return Curvature("gram", blocks, tensors, info)


def _stored_vectors(run: store.Run, blocks: BlockLayout, device: str):
    for shard in store.iter_shard_chunks(run, SUM_BYTES):
        yield shard.vectors.to(device).to(COMPUTE).reshape(-1, blocks.count, blocks.k)


def _gram_eigh(run: store.Run, blocks: BlockLayout, device: str):
    gram = torch.zeros(blocks.count, blocks.k, blocks.k, dtype=COMPUTE, device=device)
    for phi in _stored_vectors(run, blocks, device):
        gram += torch.einsum("nbi,nbj->bij", phi, phi)
    values, vectors = torch.linalg.eigh(gram / len(run.ids))
    return values.clamp_min(0), vectors  # rounding can make a null direction negative


def _kernel_eigh(run: store.Run, blocks: BlockLayout, device: str):
    phi = torch.cat(list(_stored_vectors(run, blocks, device)))  # n < k: smaller than G
    n = len(phi)
    values, u = torch.linalg.eigh(torch.einsum("ibk,jbk->bij", phi, phi) / n)
    # directions of (near) zero eigenvalue are left to the damping: their vectors are dropped
    kept = values > values[:, -1:] * RELATIVE_NULL
    values = torch.where(kept, values, 0.0)
    scale = torch.where(kept, (n * values).clamp_min(1e-300).rsqrt(), 0.0)
    vectors = torch.einsum("ibk,bir->bkr", phi, u) * scale[:, None, :]
    return values, vectors


# --- kfac: the factors of each module, from the factor pass of the extraction stage ---


def kronecker_dims(run: store.Run) -> tuple[int, int]:
    """(k_out, k_in) of a params kronecker run, or a UserError: kfac needs its layout."""
    projection = run.manifest.projection or {}
    if run.manifest.target != "params" or projection.get("type") != "kronecker":
        raise UserError(
            f"--precondition kfac needs a params run projected by kronecker (--target params "
            f"--proj_type kronecker); {run.path} is {run.manifest.target} "
            f"{projection.get('type', 'full')}: use --precondition gram"
        )
    k_out, k_in = projection["per_module"]
    return int(k_out), int(k_in)


def kfac_factorization(run: store.Run, sums: dict[str, torch.Tensor], tokens: int) -> Curvature:
    """The kfac factorization of `run` from its factor pass (`gradproj.extract.factors`): each
    module's summed `out` and `in` outer products over `tokens` tokens, as covariances,
    eigendecomposed."""
    k_out, k_in = kronecker_dims(run)
    blocks = vector_blocks(run.manifest, len(run.manifest.modules) * k_out * k_in)
    tensors = {}
    for side, total in sums.items():
        values, vectors = torch.linalg.eigh(total / max(tokens, 1))
        tensors[f"{side}_eigenvalues"] = values.clamp_min(0).cpu()
        tensors[f"{side}_eigenvectors"] = vectors.cpu().contiguous()
    info = {
        "n_vectors": len(run.ids),
        "tokens": tokens,
        "per_module": [k_out, k_in],
        "run": str(run.path.resolve()),
        "fields": run_fields(run),
    }
    return Curvature("kfac", blocks, tensors, info)


# --- The file ---


def save(curvature: Curvature, path: Path) -> None:
    tensors = curvature.tensors
    info = {
        "format": CURVATURE_FORMAT,
        "kind": curvature.kind,
        "modules": list(curvature.blocks.names),
        "block_dim": curvature.blocks.k,
        "content_sha256": fsio.content_sha256(tensors),
        **curvature.info,
    }
    fsio.write_safetensors(tensors, path, info)


def load(path: Path) -> Curvature:
    try:
        with safe_open(str(path), framework="pt") as f:
            info = fsio.read_metadata(f)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:
        raise UserError(f"--curvature {path} is not a curvature file ({err}); delete it") from None
    if info.get("format") != CURVATURE_FORMAT:
        raise UserError(
            f"--curvature {path} has format {info.get('format')!r}, not {CURVATURE_FORMAT}; "
            "delete it to recompute it"
        )
    if fsio.content_sha256(tensors) != info.pop("content_sha256", None):
        raise UserError(
            f"--curvature {path} is damaged: its tensors do not match the checksum it records; "
            "delete it, and the next scoring recomputes it"
        )
    blocks = BlockLayout(tuple(info.pop("modules")), info.pop("block_dim"))
    kind = info.pop("kind")
    info.pop("format")
    return Curvature(kind, blocks, tensors, info)


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
    """The stored factorization of `run` at `path`, checked; else gram's computed and stored
    there. kfac's factors come from the model, which scoring does not read: they must have
    been stored by the factor pass (`gradproj score` runs it first)."""
    check_supported(run)
    fsio.check_output(path, "--curvature")
    if stored(path):
        curvature = load(path)
        check_belongs(curvature, kind, run, path)
        return curvature
    if kind == "kfac":
        raise UserError(
            f"--curvature {path}: no current kfac factors of {run.path}; they come from the "
            "model: run gradproj score --precondition kfac on the run, which computes them"
        )
    check_file_writable(path)
    curvature = compute_gram(run, device)
    save(curvature, path)
    return curvature


def stored(path: Path) -> bool:
    """Whether `path` holds a factorization to read rather than to compute: a file of an
    earlier format of ours is a cache to recompute (said on stderr)."""
    if path.is_file() and older_format(path):
        print(f"warning: {path} was written by an older gradproj: recomputing it", file=sys.stderr)
        return False
    return path.is_file()


def older_format(path: Path) -> bool:
    """Whether `path` is a curvature file of an earlier format of ours (a cache this gradproj
    recomputes), as opposed to the current one or a file that is not ours (refused by `load`)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            found = fsio.read_metadata(f).get("format", "")
    except Exception:
        return False
    prefix = CURVATURE_FORMAT.split("/")[0] + "/"
    return isinstance(found, str) and found.startswith(prefix) and found != CURVATURE_FORMAT


def check_file_writable(path: Path) -> None:
    fsio.check_writable(path.parent, f"the curvature file {path}", "--curvature path")


def default_path(train_run: Path, kind: str) -> Path:
    return Path(train_run) / "curvature" / f"{kind}.safetensors"


# --- Applying it ---


def check_options(damping: float, path: str | None) -> None:
    """Refuse, before any work, a --damping outside [MIN_DAMPING, MAX_DAMPING] (inf and NaN
    too) and a --curvature path that a write would replace though not a regular file."""
    if path is not None:
        fsio.check_output(path, "--curvature")
    if not MIN_DAMPING <= damping <= MAX_DAMPING:
        raise UserError(
            f"--damping {damping:g}: use a value from {MIN_DAMPING:g} to {MAX_DAMPING:g}, a "
            "multiple of each block's mean eigenvalue (below, the whitening scales rounding "
            "noise; above, it only divides the plain scores)"
        )


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


class KfacWhitener:
    """`x -> x (S_out (x) S_in + lambda I)^-1/2` per module, through the factors' eigenbases:
    with `S_out = Q_o diag(a) Q_o^T`, `S_in = Q_i diag(b) Q_i^T`, a module's `[k_out, k_in]`
    block X becomes `Q_o ((Q_o^T X Q_i) / sqrt(a b^T + lambda)) Q_i^T` (exact for the Kronecker
    product, whose eigenvalues are the products a_o b_i); lambda = damping x their mean."""

    def __init__(self, curvature: Curvature, damping: float, device: str):
        self.blocks = curvature.blocks
        self.k_out, self.k_in = curvature.info["per_module"]
        t = {name: v.to(device, COMPUTE) for name, v in curvature.tensors.items()}
        self.q_out, self.q_in = t["out_eigenvectors"], t["in_eigenvectors"]
        products = t["out_eigenvalues"][:, :, None] * t["in_eigenvalues"][:, None, :]
        means = products.mean((1, 2))
        self.lambdas = torch.where(means > 0, damping * means, damping)
        self.scale = (products + self.lambdas[:, None, None]).rsqrt()

    @property
    def nbytes(self) -> int:
        return (self.q_out.numel() + self.q_in.numel() + self.scale.numel()) * 8

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        if vectors.shape[-1] != self.blocks.width:
            raise UserError(
                f"vectors of {vectors.shape[-1]} coordinates, but the curvature file covers "
                f"{self.blocks.width}; use the factorization of a run with the same projection"
            )
        x = vectors.reshape(len(vectors), self.blocks.count, self.k_out, self.k_in)
        y = torch.einsum("bpo,nbpi,biq->nboq", self.q_out, x, self.q_in) * self.scale
        out = torch.einsum("bop,nbpq,biq->nboi", self.q_out, y, self.q_in)
        return out.reshape(vectors.shape)


def make_whitener(curvature: Curvature, damping: float, device: str):
    """The callable that whitens vectors by the factorization (any number, one included)."""
    kind = KfacWhitener if curvature.kind == "kfac" else Whitener
    return kind(curvature, damping, device)
