"""Influence scores: every train example against every test example, by dot product and cosine.

Arithmetic. The stored operands (fp32 vectors, fp32 or bf16 ragged rows) are promoted to fp64,
which is exact, and multiplied and summed in fp64: the product of two fp32 numbers is exact in
fp64, so this is fp32 operands with fp64 accumulation. Cosine divides that dot product by the two
norms, themselves computed in fp64 from the stored values. With `precision="fp32"` each score is
rounded once to fp32 at the end; `precision="fp64"` keeps the fp64 values (a reference).

Streaming. The test set is held on the device (in blocks if it does not fit half the memory
budget); the train set is read block by block through `store.iter_shard_chunks`, never whole, so the
working memory is bounded by the block size. The score matrix itself, `n_test x n_train` per
function, is the output and is held in host memory.

Full (unprojected) runs are scored from their ragged storage: the position-aligned inner product
of a `[la, h]` and a `[lb, h]` gradient is the sum over t < min(la, lb) of <a_t, b_t>. Positions
are cut into chunks of P; for chunk c only the examples longer than c * P take part, padded with
zeros to the chunk's end, so the product never densifies to `max_seq_length * hidden`.

What is written, and how, is `gradproj.scoredir`'s: this module computes what goes in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from gradproj import store
from gradproj.errors import UserError
from gradproj.influence.config import PRECISIONS, ScoreConfig
from gradproj.influence.memory import MemoryPlan, stored_layout

COMPUTE = torch.float64
STORED_ZERO = "all-zero stored gradient"  # an exclusion found by scoring, not extraction
# Coordinates per chunk of the position-aligned product (P = this // hidden positions): large
# enough for an efficient matmul, small enough that padding to a chunk's end wastes little.
CHUNK_COORDS = 16384


# --- Operands: one block of examples, ready for products on the device ---


@dataclass
class ExampleBlock:
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


def dense_block(shard: store.Shard, device: str, transform=None) -> ExampleBlock:
    vectors = shard.vectors.to(device).to(COMPUTE)  # widen on the device: half the transfer
    if transform is not None:  # a preconditioner (curvature.Whitener): norms are the whitened
        vectors = transform(vectors)
    norms = torch.linalg.vector_norm(vectors, dim=1)
    return ExampleBlock(shard.ids, shard.index.tolist(), norms, dense=vectors)


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
    return ExampleBlock(
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


def block_dot(test: ExampleBlock, train: ExampleBlock) -> torch.Tensor:
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


@dataclass
class Scoring:
    """What `compute_scores` gives: the scores, the memory plan they were computed under, and
    the preconditioner's entry in summary.json (None for plain scores)."""

    scores: Scores
    plan: MemoryPlan
    whitening: dict | None


class Scorer:
    def __init__(
        self, cfg: ScoreConfig, train: store.Run, test: store.Run, plan: MemoryPlan, transform=None
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

    def block(self, shard: store.Shard, role: str) -> ExampleBlock:
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
        for test_shard in store.iter_shard_chunks(self.test, self.plan.test_bytes):
            test_block = self.block(test_shard, "test")
            test_norms[row : row + len(test_block)] = test_block.norms.cpu()
            _extend(test_meta, test_block)
            col = 0
            for train_shard in store.iter_shard_chunks(self.train, self.plan.train_bytes):
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

    def score_pair(
        self, test: ExampleBlock, train: ExampleBlock, matrices: dict, row: int, col: int
    ) -> None:
        dot = block_dot(test, train)
        values = {"dot": dot}
        if "cosine" in matrices:
            values["cosine"] = cosine(dot, test.norms, train.norms)
        for name, matrix in matrices.items():
            result = values[name].to(matrix.dtype).cpu()
            check_finite_scores(result, name, test.ids, train.ids)
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


def _extend(meta: tuple[list, list], block: ExampleBlock) -> None:
    meta[0].extend(block.ids)
    meta[1].extend(block.index)


def _keep(norms: torch.Tensor, ids: list, index: list, excluded: list[dict]) -> torch.Tensor:
    keep = norms > 0
    for i in torch.nonzero(~keep).flatten().tolist():
        excluded.append({"id": ids[i], "index": index[i], "reason": STORED_ZERO})
    return keep


def _kept(values: list, keep: torch.Tensor) -> list:
    return [v for v, k in zip(values, keep.tolist(), strict=True) if k]


def check_finite_scores(scores: torch.Tensor, name: str, test_ids: list, train_ids: list) -> None:
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


def manifest_exclusions(run: store.Run) -> list[dict]:
    return [
        {"id": s["id"], "index": s.get("index"), "reason": s.get("reason", "skipped")}
        for s in run.skipped
    ]


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
