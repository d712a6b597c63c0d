"""Influence scores: every train example against every test example, by dot product and cosine.

Arithmetic. The stored operands (fp32 vectors, fp32 or bf16 ragged rows) are promoted to fp64,
which is exact, and multiplied and summed in fp64: the product of two fp32 numbers is exact in
fp64, so this is fp32 operands with fp64 accumulation. Cosine divides that dot product by the two
norms, themselves computed in fp64 from the stored values. With `precision="fp32"` each score is
rounded once to fp32 at the end; `precision="fp64"` keeps the fp64 values (a reference).

Streaming. The test set is held on the device (in blocks if it does not fit half the memory
budget); the train set is read block by block through `store.iter_blocks`, never whole, so the
working memory is bounded by the block size. The score matrix itself, `n_test x n_train` per
function, is the output and is held in host memory.

Full (unprojected) runs are scored from their ragged storage: the position-aligned inner product
of a `[la, h]` and a `[lb, h]` gradient is the sum over t < min(la, lb) of <a_t, b_t>. Positions
are cut into chunks of P; for chunk c only the examples longer than c * P take part, padded with
zeros to the chunk's end, so the product never densifies to `max_seq_length * hidden`.

What is written, and how, is `gradproj.scoredir`'s: this module computes what goes in.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gradproj import __version__, curvature, scoredir, store
from gradproj.errors import UserError, check_unique_ids
from gradproj.scoredir import FUNCTIONS

FUNC_CHOICES = (*FUNCTIONS, "both")
PRECONDITIONERS = ("none", *curvature.KINDS)
# Options recorded in summary.json only when preconditioning: plain scorings keep their bytes.
PRECONDITION_OPTIONS = ("precondition", "damping", "curvature")
PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}
COMPUTE = torch.float64
STORED_ZERO = "all-zero stored gradient"  # an exclusion found by scoring, not extraction
# Coordinates per chunk of the position-aligned product (P = this // hidden positions): large
# enough for an efficient matmul, small enough that padding to a chunk's end wastes little.
CHUNK_COORDS = 16384
# Bytes held per stored byte of a block: the block as read plus its fp64 copy on the device.
_FP64 = 8
# Score bytes per (test, train) pair on the device: fp64 dot and cosine, and their output copy.
_PAIR_BYTES = 3 * _FP64
MANIFEST_FIELDS = (
    "kind", "projection", "model", "checkpoint", "checkpoint_nr", "target", "dataset", "split",
    "mode", "hidden_size", "max_seq_length", "n_examples",
)  # fmt: skip
REQUIRED_FIELDS = ("kind", "model", "checkpoint", "target", "shards", "examples", "skipped")


@dataclass
class ScoreConfig:
    train: str
    test: str
    func: str = "both"
    output: str | None = None
    where: str | None = None
    mapped: bool = False
    top_k: int = 100
    device: str | None = None
    dataset: str | None = None
    precision: str = "fp32"
    memory_gb: float | None = None
    precondition: str = "none"
    damping: float = curvature.DEFAULT_DAMPING
    curvature: str | None = None

    def __post_init__(self):
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.func in FUNC_CHOICES, f"--func {self.func!r}: use dot, cosine or both"),
            (self.top_k >= 1, "--top_k must be at least 1"),
            (self.precision in PRECISIONS, f"--precision {self.precision!r}: use fp32 or fp64"),
            (self.memory_gb is None or self.memory_gb > 0, "--memory_gb must be positive"),
            (not (self.output and self.where), "give --output or --where, not both"),
            (self.dataset is None or self.mapped, "--dataset is only used with --mapped"),
            (self.device.startswith(("cpu", "cuda")), f"--device {self.device!r}: use cpu, cuda"),
            (
                self.precondition in PRECONDITIONERS,
                f"--precondition {self.precondition!r}: use {', '.join(PRECONDITIONERS)}",
            ),
            (
                self.curvature is None or self.precondition != "none",
                "--curvature is only used with --precondition",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        curvature.check_options(self.damping, self.curvature)
        if self.output is not None:  # before the lock file beside it is made
            store.check_output(self.output, "--output", directory=True)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but no CUDA device is visible")

    @property
    def functions(self) -> tuple[str, ...]:
        return FUNCTIONS if self.func == "both" else (self.func,)


# --- Inputs: runs, their compatibility, their exclusions ---


def open_run(path: str, role: str) -> store.Run:
    """A complete, non-empty run, or a UserError that names the role and what is wrong."""
    try:
        run = store.Run(path)
        missing = [key for key in REQUIRED_FIELDS if key not in run.manifest]
        if missing:
            raise UserError(f"{path}: manifest.json lacks {', '.join(missing)}; re-extract")
        run.require_complete()
        check_unique_ids(run.ids, f"run {path}")
    except UserError as err:
        raise UserError(f"--{role}: {err}") from None
    return run


def identity(manifest: dict) -> dict:
    """What two runs must share for their gradients to be comparable."""
    projection = manifest.get("projection") or {}
    fields = {
        "model": manifest.get("model"),
        "checkpoint": manifest.get("checkpoint"),
        "target": manifest.get("target"),
        "hidden_size": manifest.get("hidden_size"),
        "projection type": projection.get("type", "full"),
        "projection seed": projection.get("seed"),
        "projection dim": projection.get("dim"),
        "projection generator": projection.get("generator"),
        "projection scale": projection.get("scale"),
    }
    if projection.get("type") == "kronecker":  # its factors depend on the gradient's shape
        fields["projection shape"] = projection.get("shape")
    if manifest.get("target") == "params":  # vectors of different layers are not comparable
        fields["modules"] = [m["name"] for m in manifest.get("modules") or []]
    return fields


def check_compatible(train: store.Run, test: store.Run) -> None:
    a, b = identity(train.manifest), identity(test.manifest)
    keys = list(dict.fromkeys([*a, *b]))
    differences = [f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]
    if differences:
        raise UserError(
            f"train and test runs differ in {'; '.join(differences)}: their gradients are not "
            "comparable; extract both with the same model, checkpoint, target and projection"
        )


def warn_truncation(train: store.Run, test: store.Run) -> None:
    """Runs of different --max_seq_length are comparable, but their examples were cut at
    different lengths (for the embedding target, position-aligned gradients of different
    prefixes): scored, with a warning."""
    lengths = train.manifest.get("max_seq_length"), test.manifest.get("max_seq_length")
    if None not in lengths and lengths[0] != lengths[1]:
        print(
            f"warning: the train run was extracted with max_seq_length {lengths[0]} and the "
            f"test run with {lengths[1]}: examples longer than {min(lengths)} tokens were cut "
            "at different lengths; extract both with one --max_seq_length to compare like "
            "with like",
            file=sys.stderr,
        )


def manifest_exclusions(run: store.Run) -> list[dict]:
    return [
        {"id": s["id"], "index": s.get("index"), "reason": s.get("reason", "skipped")}
        for s in run.skipped
    ]


# --- Memory plan ---


@dataclass
class Plan:
    """Block sizes, in stored bytes, for the test set and the train set."""

    budget_bytes: int
    test_bytes: int
    train_bytes: int


def default_budget_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(0.8 * free)
    return int(0.5 * available_host_bytes())


def available_host_bytes() -> int:
    """MemAvailable (free plus reclaimable page cache); free pages where /proc is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Layout:
    """How a run stores its gradients: ragged `values` rows or one `vectors` row per example."""

    ragged: bool
    elem_bytes: int
    width: int  # k, or the hidden size of a ragged row
    mean_elems: int  # stored elements per example, on average


def stored_layout(run: store.Run) -> Layout:
    ragged, elem, width = run.stored_rows()
    if not ragged:
        return Layout(False, elem, width, width)
    tokens = [e.get("tokens", 1) for e in run.manifest["examples"]]
    return Layout(True, elem, width, max(1, sum(tokens) // len(tokens)) * width)


def plan_memory(cfg: ScoreConfig, train: store.Run, test: store.Run) -> Plan:
    """Half the budget for a test block, half for a train block and its columns of scores."""
    budget = int(cfg.memory_gb * 2**30) if cfg.memory_gb else default_budget_bytes(cfg.device)
    test_layout, train_layout = stored_layout(test), stored_layout(train)
    # a block costs its stored bytes plus their fp64 copy
    test_bytes = max(1, budget // 2 * test_layout.elem_bytes // (test_layout.elem_bytes + _FP64))
    test_example = test_layout.mean_elems * test_layout.elem_bytes
    n_test = min(len(test.ids), max(1, test_bytes // test_example))
    per_example = train_layout.mean_elems * (train_layout.elem_bytes + _FP64)
    n_train = max(1, budget // 2 // (per_example + n_test * _PAIR_BYTES))
    return Plan(budget, test_bytes, n_train * train_layout.mean_elems * train_layout.elem_bytes)


# --- Operands: one block of examples, ready for products on the device ---


@dataclass
class Block:
    """A block's ids, dataset rows and fp64 norms; `dense` or `chunks` hold the values."""

    ids: list[str]
    index: list[int]
    norms: torch.Tensor
    dense: torch.Tensor | None = None
    # full runs: examples sorted by length, descending; chunk c is [active_c, P * hidden]
    order: torch.Tensor | None = None
    chunks: list[torch.Tensor] | Iterator[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def dense_block(shard: store.Shard, device: str, transform=None) -> Block:
    vectors = shard.vectors.to(device).to(COMPUTE)  # widen on the device: half the transfer
    if transform is not None:  # a preconditioner (curvature.Whitener): norms are the whitened
        vectors = transform(vectors)
    norms = torch.linalg.vector_norm(vectors, dim=1)
    return Block(shard.ids, shard.index.tolist(), norms, dense=vectors)


def ragged_block(shard: store.Shard, device: str, positions: int, n_chunks: int, lazy: bool):
    """A full block, chunked by `positions`; `lazy` builds the chunks only when iterated."""
    values = shard.values.to(device)
    offsets = shard.offsets.to(device)
    lengths = offsets[1:] - offsets[:-1]
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    squares = values.to(COMPUTE).square().sum(1)
    # index_add, not a cumsum difference: a small example's norm must not cancel away
    norms = torch.zeros(len(lengths), dtype=COMPUTE, device=device).index_add_(0, owner, squares)
    order = torch.argsort(lengths, descending=True, stable=True)
    chunks = _position_chunks(values, offsets[:-1][order], lengths[order], positions, n_chunks)
    return Block(
        shard.ids, shard.index.tolist(), norms.sqrt(), order=order,
        chunks=chunks if lazy else list(chunks),
    )  # fmt: skip


def _position_chunks(values, starts, lengths, positions: int, n_chunks: int):
    """Chunk c: positions [c*P, (c+1)*P) of the examples longer than c*P, zero-padded, fp64."""
    longest = int(lengths[0]) if len(lengths) else 0
    step = torch.arange(positions, device=values.device)
    for c in range(min(n_chunks, -(-longest // positions))):
        p0 = c * positions
        active = int((lengths > p0).sum())
        pos = p0 + step
        inside = pos[None, :] < lengths[:active, None]
        rows = (starts[:active, None] + pos[None, :])[inside]
        padded = torch.zeros(
            active, positions, values.shape[1], dtype=COMPUTE, device=values.device
        )
        padded[inside] = values[rows].to(COMPUTE)
        yield padded.reshape(active, -1)


def block_dot(test: Block, train: Block) -> torch.Tensor:
    """fp64 `[len(test), len(train)]` dot products."""
    if test.dense is not None:
        return test.dense @ train.dense.T
    out = torch.zeros(len(test), len(train), dtype=COMPUTE, device=test.norms.device)
    for t_chunk, a_chunk in zip(test.chunks, train.chunks, strict=False):
        out[: len(t_chunk), : len(a_chunk)] += t_chunk @ a_chunk.T
    # rows and columns are in length order; put them back in run order
    return out[torch.argsort(test.order)][:, torch.argsort(train.order)]


def cosine(dot: torch.Tensor, test_norms: torch.Tensor, train_norms: torch.Tensor):
    """dot / (|test| |train|) in fp64; 0 where a norm is 0 (those examples are dropped later)."""
    denominator = test_norms[:, None] * train_norms[None, :]
    positive = denominator > 0
    return torch.where(positive, dot, 0.0) / torch.where(positive, denominator, 1.0)


# --- Scoring ---


@dataclass
class Scores:
    """Score matrices over every stored example, then trimmed to the kept ones."""

    matrices: dict[str, torch.Tensor]
    train_ids: list[str]
    train_index: list[int]
    test_ids: list[str]
    test_index: list[int]
    excluded: dict[str, list[dict]]
    blocks: dict[str, int]


class Scorer:
    def __init__(
        self, cfg: ScoreConfig, train: store.Run, test: store.Run, plan: Plan, transform=None
    ):
        self.cfg, self.train, self.test, self.plan = cfg, train, test, plan
        self.transform = transform  # applied to every block of both sides, or None
        self.layout = stored_layout(train)
        self.full = self.layout.ragged
        self.positions, self.n_chunks = self._chunking()

    def _chunking(self) -> tuple[int, int]:
        if not self.full:
            return 0, 0
        longest = max(1, self.test.longest_example())
        positions = max(1, min(CHUNK_COORDS // self.layout.width, longest))
        # train positions past the longest test example meet nothing
        return positions, -(-longest // positions)

    def block(self, shard: store.Shard, role: str) -> Block:
        """A block on the device; train chunks are built lazily, as the product consumes them."""
        if self.full:
            lazy = role == "train"
            block = ragged_block(shard, self.cfg.device, self.positions, self.n_chunks, lazy)
        else:
            block = dense_block(shard, self.cfg.device, self.transform)
        bad = torch.nonzero(~torch.isfinite(block.norms)).flatten().tolist()
        if bad:
            raise UserError(
                f"{role} example {block.ids[bad[0]]!r} has a gradient holding inf or NaN "
                f"({len(bad)} such in its block); re-extract it in fp32"
            )
        return block

    def run(self) -> Scores:
        n_train, n_test = len(self.train.ids), len(self.test.ids)
        out = PRECISIONS[self.cfg.precision]
        matrices = {f: torch.empty(n_test, n_train, dtype=out) for f in self.cfg.functions}
        train_norms = torch.empty(n_train, dtype=COMPUTE)
        test_norms = torch.empty(n_test, dtype=COMPUTE)
        train_meta, test_meta, blocks = ([], []), ([], []), {"test": 0, "train": 0}
        row = 0
        for test_shard in store.iter_blocks(self.test, self.plan.test_bytes):
            test_block = self.block(test_shard, "test")
            test_norms[row : row + len(test_block)] = test_block.norms.cpu()
            _extend(test_meta, test_block)
            col = 0
            for train_shard in store.iter_blocks(self.train, self.plan.train_bytes):
                train_block = self.block(train_shard, "train")
                if blocks["test"] == 0:
                    train_norms[col : col + len(train_block)] = train_block.norms.cpu()
                    _extend(train_meta, train_block)
                    blocks["train"] += 1
                self.score_pair(test_block, train_block, matrices, row, col)
                col += len(train_block)
            row += len(test_block)
            blocks["test"] += 1
        return self.trim(matrices, train_meta, test_meta, train_norms, test_norms, blocks)

    def score_pair(self, test: Block, train: Block, matrices: dict, row: int, col: int) -> None:
        dot = block_dot(test, train)
        values = {"dot": dot}
        if "cosine" in matrices:
            values["cosine"] = cosine(dot, test.norms, train.norms)
        for name, matrix in matrices.items():
            result = values[name].to(matrix.dtype).cpu()
            check_finite(result, name, test.ids, train.ids)
            matrix[row : row + len(test), col : col + len(train)] = result

    def trim(self, matrices, train_meta, test_meta, train_norms, test_norms, blocks) -> Scores:
        """Drop the examples whose stored gradient is all zeros; report every exclusion."""
        excluded = {
            "train": manifest_exclusions(self.train),
            "test": manifest_exclusions(self.test),
        }
        keep_train = _keep(train_norms, *train_meta, excluded["train"])
        keep_test = _keep(test_norms, *test_meta, excluded["test"])
        if not keep_train.any() or not keep_test.any():
            raise UserError("every train or every test gradient is all zeros; nothing to score")
        if not keep_train.all() or not keep_test.all():
            matrices = {k: v[keep_test][:, keep_train] for k, v in matrices.items()}
        return Scores(
            matrices,
            _kept(train_meta[0], keep_train),
            _kept(train_meta[1], keep_train),
            _kept(test_meta[0], keep_test),
            _kept(test_meta[1], keep_test),
            excluded,
            blocks,
        )


def _extend(meta: tuple[list, list], block: Block) -> None:
    meta[0].extend(block.ids)
    meta[1].extend(block.index)


def _keep(norms: torch.Tensor, ids: list, index: list, excluded: list[dict]) -> torch.Tensor:
    keep = norms > 0
    for i in torch.nonzero(~keep).flatten().tolist():
        excluded.append({"id": ids[i], "index": index[i], "reason": STORED_ZERO})
    return keep


def _kept(values: list, keep: torch.Tensor) -> list:
    return [v for v, k in zip(values, keep.tolist(), strict=True) if k]


def check_finite(scores: torch.Tensor, name: str, test_ids: list, train_ids: list) -> None:
    # an fp64 sum of scores (each below 2**128) is finite exactly when every score is
    if torch.isfinite(scores.sum(dtype=torch.float64)):
        return
    bad = torch.nonzero(~torch.isfinite(scores))
    if len(bad):
        i, j = bad[0].tolist()
        raise UserError(
            f"{name} score of test example {test_ids[i]!r} and train example {train_ids[j]!r} is "
            f"{scores[i, j].item()} ({len(bad)} non-finite in this block): a stored gradient "
            "holds inf or NaN; re-extract it in fp32"
        )


# --- Outputs ---


def dataset_label(manifest: dict) -> str:
    name = str(manifest.get("dataset", "dataset")).rstrip("/")
    name = Path(name).stem if Path(name).suffix in (".json", ".jsonl", ".parquet") else name
    label = name.rsplit("/", 1)[-1]
    split = str(manifest.get("split", "train"))
    if split != "train":
        label += "_" + re.sub(r"[^\w.-]+", "_", split).strip("_")
    return label


def output_dir(cfg: ScoreConfig, train: store.Run, test: store.Run) -> Path:
    if cfg.output:
        return Path(cfg.output)
    projection = train.manifest.get("projection")
    dim = str(projection["dim"]) if projection else "full"
    if projection and projection["type"] != "rademacher":
        # the original layout names the dim only; other types must not overwrite rademacher's
        dim = f"{projection['type']}_{dim}"
    if cfg.precondition != "none":  # never overwrite the plain scores of the same runs
        dim += f"_{cfg.precondition}"
    where = cfg.where or f"{dataset_label(train.manifest)}__{dataset_label(test.manifest)}"
    return Path("explainability") / dim / where / cfg.func


def ranked(scores: torch.Tensor) -> torch.Tensor:
    """Positions by score, descending, along the last dim; ties keep their order (no NaN here)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def top_positions(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the first k of `ranked(row)`: `[n_rows, k]`, without sorting whole rows."""
    k = min(k, matrix.shape[1])
    best = torch.topk(matrix, k, dim=1)
    # order the chosen by (score descending, position): sort by position, then stably by score
    chosen = best.indices.sort(dim=1).values
    chosen = chosen.gather(1, ranked(matrix.gather(1, chosen)))
    # topk picks any of several tied at the k-th score; where a tie was cut, pick the first ones
    threshold = best.values[:, -1:]
    cut = (matrix == threshold).sum(1) > (best.values == threshold).sum(1)
    for j in torch.nonzero(cut).flatten().tolist():
        row = matrix[j]
        above = torch.nonzero(row > threshold[j]).flatten()
        ties = torch.nonzero(row == threshold[j]).flatten()[: k - len(above)]
        picked = torch.cat([above, ties]).sort().values
        chosen[j] = picked[ranked(row[picked])]
    return chosen


def topk_positions(scores: Scores, k: int) -> dict[str, tuple[list, list]]:
    """Per function, each test row's top k and bottom k train columns, highest and lowest first."""
    # negation is exact, so the lowest come first with ties still in train order
    return {
        name: (top_positions(m, k).tolist(), top_positions(-m, k).tolist())
        for name, m in scores.matrices.items()
    }


def per_test_stats(scores: Scores) -> dict:
    """Mean and population std (ddof 0) over the train examples, in fp64, per test example."""
    stats = {}
    for name, matrix in scores.matrices.items():
        values = matrix.to(torch.float64)
        stats[name] = {
            "mean": values.mean(1).tolist(),
            "std": values.std(1, correction=0).tolist(),
        }
    return stats


def manifest_summary(run: store.Run) -> dict:
    """The run's description; `examples_sha256` names its examples (dataset rows and ids, kept
    and skipped), so that `gradproj compare` can tell scorings of other examples apart."""
    described = {key: run.manifest.get(key) for key in MANIFEST_FIELDS}
    return described | {
        "manifest_sha256": store.file_sha256(run.path / store.MANIFEST),
        "examples_sha256": store.examples_sha256(run.manifest),
    }


def summary(cfg: ScoreConfig, scores: Scores, train, test, plan: Plan, whitening=None) -> dict:
    options = asdict(cfg)
    if cfg.precondition == "none":
        options = {k: v for k, v in options.items() if k not in PRECONDITION_OPTIONS}
    return {
        "functions": list(cfg.functions),
        "precision": cfg.precision,
        "counts": {
            "train": len(scores.train_ids),
            "test": len(scores.test_ids),
            "train_excluded": len(scores.excluded["train"]),
            "test_excluded": len(scores.excluded["test"]),
        },
        "excluded": scores.excluded,
        "test_ids": scores.test_ids,
        "per_test": per_test_stats(scores),
        "blocks": scores.blocks | {"memory_budget_bytes": plan.budget_bytes},
        "options": options,
        "train_run": str(train.path.resolve()),
        "test_run": str(test.path.resolve()),
        "train_manifest": manifest_summary(train),
        "test_manifest": manifest_summary(test),
        "versions": {"gradproj": __version__},
    } | ({"preconditioner": whitening} if whitening else {})


# Options that change what a scoring writes; the rest (where it goes, the device, the memory
# budget, which sets only the block sizes) do not.
SCORING_OPTIONS = ("func", "mapped", "top_k", "dataset", "precision")


def scoring_inputs(summary: dict) -> dict:
    """What a score directory's content depends on: the runs (their manifests' checksums, which
    cover every shard's), the options that change the output, the gradproj that scored."""
    return {
        "runs": [summary.get("train_run"), summary.get("test_run")],
        "manifests": [
            (summary.get(role) or {}).get("manifest_sha256")
            for role in ("train_manifest", "test_manifest")
        ],
        "options": {key: (summary.get("options") or {}).get(key) for key in SCORING_OPTIONS},
        "gradproj": (summary.get("versions") or {}).get("gradproj"),
    }


def up_to_date(out: Path, cfg: ScoreConfig, train: store.Run, test: store.Run) -> bool:
    """Whether `out` holds a scoring of these runs, as they are now, with these options.
    Preconditioned scorings are always redone: they also depend on a factorization file."""
    if cfg.precondition != "none":
        return False
    if not (out / scoredir.SCORES_FILE).is_file() or not scoredir.is_score_dir(out):
        return False
    wanted = {
        "train_run": str(train.path.resolve()),
        "test_run": str(test.path.resolve()),
        "train_manifest": manifest_summary(train),
        "test_manifest": manifest_summary(test),
        "options": asdict(cfg),
        "versions": {"gradproj": __version__},
    }
    return scoring_inputs(scoredir.read_summary(out)) == scoring_inputs(wanted)


# --- Mapped JSON: the original study's per-test-example files ---


def train_fragments(dataset: str, split: str, scores: Scores) -> list[str]:
    """Each kept train row's fields as a JSON object body, serialised once for every file."""
    from gradproj import data  # imports `datasets`, which only --mapped needs

    rows = data.load_split(dataset, data.split_name(split))  # indices are rows of the split
    if scores.train_index and max(scores.train_index) >= len(rows):
        raise UserError(
            f"dataset {dataset} split {split} has {len(rows)} rows, but the train run refers "
            f"to row {max(scores.train_index)}; pass the dataset the run was extracted from"
        )
    fragments = []
    for example_id, i in zip(scores.train_ids, scores.train_index, strict=True):
        row = rows[i]
        if data.example_id(row, i) != example_id:
            raise UserError(
                f"row {i} of {dataset} has id {data.example_id(row, i)!r}, but the train run "
                f"has {example_id!r} there; pass the dataset the run was extracted from"
            )
        fields = {k: v for k, v in row.items() if k != "score"}  # the score key wins
        fragments.append(json.dumps(fields, ensure_ascii=False, default=str)[1:-1])
    return fragments


def mapped_entries(row: torch.Tensor, fragments: list[str]) -> Iterator[tuple[float, str]]:
    """(score, train sample fields) of one test row, by score, highest first (ties in order)."""
    for i in ranked(row).tolist():
        yield row[i].item(), fragments[i]


def write_mapped(out: Path, cfg: ScoreConfig, scores: Scores, train: store.Run) -> None:
    dataset = cfg.dataset or train.manifest.get("dataset")
    fragments = train_fragments(dataset, train.manifest.get("split", "train"), scores)
    several = len(scores.matrices) > 1
    for name, matrix in scores.matrices.items():
        for j, test_index in enumerate(scores.test_index):
            entries = mapped_entries(matrix[j], fragments)
            scoredir.write_mapped(out, name, test_index, entries, several)


# --- The command ---


def warn_excluded(excluded: dict[str, list[dict]]) -> None:
    """Warn about the exclusions scoring found itself. Those the extraction skipped were warned
    about by the extraction and are listed in summary.json: scoring the same runs at several
    dims does not repeat them (the demo said the same example seven times)."""
    for role, items in excluded.items():
        items = [e for e in items if e["reason"] == STORED_ZERO]
        if items:
            named = ", ".join(f"{e['id']} ({e['reason']})" for e in items[:10])
            more = f" and {len(items) - 10} more" if len(items) > 10 else ""
            print(
                f"warning: {len(items)} {role} example(s) excluded: {named}{more}", file=sys.stderr
            )


def preconditioner(cfg: ScoreConfig, train: store.Run) -> tuple[curvature.Whitener, dict]:
    """The Whitener of `--precondition` (its stored factorization, else computed and stored),
    and its entry in summary.json."""
    path = Path(cfg.curvature or curvature.default_path(train.path, cfg.precondition))
    factorization = curvature.load_or_compute(cfg.precondition, train, path, cfg.device)
    whitener = curvature.make_whitener(factorization, cfg.damping, cfg.device)
    return whitener, {
        "kind": cfg.precondition,
        "damping": cfg.damping,
        "lambda": "damping x the block's mean eigenvalue",
        "curvature_file": str(path.resolve()),
        "curvature_sha256": store.file_sha256(path),
        "blocks": factorization.blocks.count,
        "block_dim": factorization.blocks.k,
        "bytes": whitener.nbytes,
    }


def reserve(plan: Plan, nbytes: int) -> Plan:
    """The plan with `nbytes` (the whitening's eigenvectors) taken from its budget, or a
    UserError."""
    if nbytes > plan.budget_bytes // 2:
        raise UserError(
            f"the preconditioner's matrices need {nbytes / 2**30:.3g} GiB, more than half the "
            f"{plan.budget_bytes / 2**30:.3g} GiB memory budget; raise --memory_gb"
        )
    share = (plan.budget_bytes - nbytes) / plan.budget_bytes
    # a whitened block is a second fp64 copy: halve the blocks once more
    return Plan(plan.budget_bytes, max(1, int(plan.test_bytes * share / 2)),
                max(1, int(plan.train_bytes * share / 2)))  # fmt: skip


def score_influence(cfg: ScoreConfig) -> tuple[Path, bool]:
    """Score the runs, write the score directory (replacing it whole); return its path and
    whether it was written. A directory that already holds this scoring of the runs as they are
    now is kept: scores are deterministic, so rescoring would write the same bytes."""
    train, test = open_run(cfg.train, "train"), open_run(cfg.test, "test")
    check_compatible(train, test)
    warn_truncation(train, test)
    out = output_dir(cfg, train, test)
    with scoredir.exclusive_output(out):  # before the compute: a second writer fails at once
        scoredir.check_replaceable(out)
        if up_to_date(out, cfg, train, test):
            return out, False
        plan = plan_memory(cfg, train, test)
        whitener = whitening = None
        if cfg.precondition != "none":
            plan = reserve(plan, curvature.factorization_bytes(train, cfg.precondition))
            whitener, whitening = preconditioner(cfg, train)
        scores = Scorer(cfg, train, test, plan, whitener).run()
        warn_excluded(scores.excluded)

        def build(folder: Path) -> None:
            ids = (scores.train_ids, scores.test_ids)
            scoredir.write_scores(folder, scores.matrices, *ids, train.path, test.path)
            positions = topk_positions(scores, cfg.top_k)
            lines = scoredir.topk_lines(scores.matrices, *ids, scores.test_index, positions)
            scoredir.write_topk(folder, lines)
            scoredir.write_summary(folder, summary(cfg, scores, train, test, plan, whitening))
            if cfg.mapped:
                write_mapped(folder, cfg, scores, train)

        scoredir.replace_dir(out, build)
    return out, True
