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
(`compute_kfac`), and whitened exactly through the two factors' eigenbases (`KfacWhitener`).

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
        "train shards sha256": store.shards_sha256(manifest),
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
    blocks: Blocks
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


def _stored_vectors(run: store.Run, blocks: Blocks, device: str):
    for shard in store.iter_shard_chunks(run, SUM_BYTES):
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


# --- kfac: the factors of each module, from the model once more ---


def kronecker_dims(run: store.Run) -> tuple[int, int]:
    """(k_out, k_in) of a params kronecker run, or a UserError: kfac needs its layout."""
    projection = run.manifest.get("projection") or {}
    if run.manifest.get("target") != "params" or projection.get("type") != "kronecker":
        raise UserError(
            f"--precondition kfac needs a params run projected by kronecker (--target params "
            f"--proj_type kronecker); {run.path} is {run.manifest.get('target')} "
            f"{projection.get('type', 'full')}: use --precondition gram"
        )
    k_out, k_in = projection["per_module"]
    return int(k_out), int(k_in)


def compute_kfac(run: store.Run, device: str) -> Curvature:
    """Each module's Kronecker factors in the projected space, eigendecomposed:
    `S_out = E_t[(A^T delta_t)(A^T delta_t)^T]` and `S_in = E_t[(B^T x_t)(B^T x_t)^T]` over every
    token of the run's examples (x a layer's input, delta the gradient of the example's loss at
    its output, A and B the run's own projection factors). Reads the model once more: the run's
    examples are tokenized and batched as its extraction did (the manifest's options)."""
    k_out, k_in = kronecker_dims(run)
    blocks = vector_blocks(run.manifest, len(run.manifest["modules"]) * k_out * k_in)
    sums, tokens = _factor_sums(run, extraction_options(run), device, k_out, k_in)
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


def extraction_options(run: store.Run) -> dict:
    """The options kfac reads the model and the dataset with: the extraction's, as its
    manifest records them (shards do not, so a manifest rebuilt from them lacks them)."""
    options = run.manifest.get("options")
    if not isinstance(options, dict):
        raise UserError(
            f"--precondition kfac reads the model again with the extraction's options, which "
            f"{run.path / store.MANIFEST} does not record (rebuilt by gradproj merge from the "
            "shards, which do not carry them); give the run's kfac file computed before "
            "(--curvature), restore the extraction's manifest, or use --precondition gram"
        )
    return options


def _factor_sums(run: store.Run, options: dict, device: str, k_out: int, k_in: int):
    from tqdm import tqdm

    from gradproj import data, gradients, models  # the model: only kfac needs it
    from gradproj.targets.params import Layer, layer_projection

    checkpoint = models.resolve_checkpoint(options["model"], options["checkpoint_nr"])
    tokenizer = models.load_tokenizer(checkpoint)
    examples = _run_examples(run, tokenizer, options)  # checked before the model loads
    dtype = models.resolve_dtype(options["dtype"], device)
    model = models.load_model(checkpoint, options["paradigm"], dtype, device)
    named = dict(model.named_modules())
    modules = [(m["name"], named[m["name"]]) for m in run.manifest["modules"]]
    seed, dim = run.manifest["projection"]["seed"], run.manifest["projection"]["dim"]
    factors = [
        layer_projection(seed, Layer(name, *module.weight.shape, 0), [dim], device).widest_factors()
        for name, module in modules
    ]
    position = {name: i for i, (name, _) in enumerate(modules)}
    count = len(modules)
    sums = {
        "out": torch.zeros(count, k_out, k_out, dtype=COMPUTE, device=device),
        "in": torch.zeros(count, k_in, k_in, dtype=COMPUTE, device=device),
    }
    valid = {}

    def add(side: str, name: str, projected: torch.Tensor) -> None:
        rows = projected[valid["mask"]].to(COMPUTE)  # the examples' own tokens, no padding
        sums[side][position[name]] += rows.T @ rows

    def on_input(name, x):
        add("in", name, x.float() @ factors[position[name]][1])

    def on_output_grad(name, delta):
        add("out", name, delta.float() @ factors[position[name]][0])

    tokens = 0
    causal, pad_id = options["paradigm"] != "mlm", tokenizer.pad_token_id or 0
    progress = tqdm(total=len(examples), desc="kfac factors", unit="ex")
    with gradients.LinearTaps(modules, on_input, on_output_grad), progress:
        for batch in data.batches_by_tokens(examples, options["batch_tokens"]):
            lengths = torch.tensor([ex.length for ex in batch], device=device)
            longest = int(lengths.max())
            valid["mask"] = torch.arange(longest, device=device)[None, :] < lengths[:, None]
            gradients.embedding_gradients(model, batch, causal, pad_id)
            tokens += int(lengths.sum())
            progress.update(len(batch))
    return sums, tokens


def _run_examples(run: store.Run, tokenizer, options: dict) -> list:
    """The run's examples, tokenized as its extraction tokenized them. Each must have the id,
    token count and loss-token count the run recorded: the run holds no hash of its examples'
    text, so an edit that keeps every count is not seen."""
    from gradproj import data

    dataset, paradigm = options["dataset"], options["paradigm"]
    rows, first_row = data.load_rows(dataset, options["dataset_split"])
    examples = []
    for entry in run.manifest["examples"]:
        row = rows[entry["index"] - first_row]
        ex = data.tokenize(
            tokenizer, row, entry["index"], paradigm, options["max_seq_length"],
            str(options["checkpoint_nr"]),
        )  # fmt: skip
        now = (ex.id, ex.length, data.label_positions(ex, paradigm))
        then = (entry["id"], entry["tokens"], entry["label_tokens"])
        if now != then:
            raise UserError(
                f"row {entry['index']} of {dataset} is {describe(*now)}, but the run's "
                f"extraction read {describe(*then)} there: the dataset changed since, and kfac "
                "reads it again; restore the extraction's dataset or re-extract the run"
            )
        examples.append(ex)
    return examples


def describe(example_id: str, tokens: int, label_tokens: int) -> str:
    return f"{example_id!r} of {tokens} tokens ({label_tokens} in the loss)"


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
    blocks = Blocks(tuple(info.pop("modules")), info.pop("block_dim"))
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
    """The stored factorization of `run` at `path`, checked; else computed and stored there."""
    check_supported(run)
    fsio.check_output(path, "--curvature")
    if path.is_file() and older_format(path):
        print(f"warning: {path} was written by an older gradproj: recomputing it", file=sys.stderr)
    elif path.is_file():
        curvature = load(path)
        check_belongs(curvature, kind, run, path)
        return curvature
    fsio.check_writable(path.parent, f"the curvature file {path}", "--curvature path")
    curvature = compute_kfac(run, device) if kind == "kfac" else compute_gram(run, device)
    save(curvature, path)
    return curvature


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
