"""Sparse JL (sjlt): each coordinate added, with a random sign, to s random outputs."""

import math
from collections.abc import Sequence

import torch

from gradproj.errors import UserError
from gradproj.projection.base import Projection
from gradproj.projection.generator import _shift_right_logical, counter_hash, stream_key

_MAX_SJLT_S = 256
_SJLT_BLOCK_ROWS = 1 << 20


class SjltProjection(Projection):
    proj_type = "sjlt"
    scale = "1/sqrt(s)"

    def __init__(self, *args, s: int = 1, **kwargs):
        self.sjlt_s = int(s)
        super().__init__(*args, **kwargs)
        self.sjlt_block_rows = _SJLT_BLOCK_ROWS

    def _check_arguments(self) -> None:
        super()._check_arguments()
        if not 1 <= self.sjlt_s <= _MAX_SJLT_S:
            raise UserError(f"sjlt s must be in 1..{_MAX_SJLT_S}, got {self.sjlt_s}")

    def describe(self) -> dict:
        return super().describe() | {"s": self.sjlt_s}

    def project_batch(self, grads: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        flats = self._flatten_all(grads)
        return {k: self._project_sjlt(flats, k) for k in self.dims}

    def _project_sjlt(self, flats: list[torch.Tensor], k: int) -> torch.Tensor:
        """fp32 CPU [B, k]: each coordinate added, with a random sign, to s random outputs.

        Each example's positive and negative terms are summed apart, in coordinate order,
        into bins [0, k) and [k, 2k), and subtracted at the end: no multiplication by signs,
        and the same bytes for any chunking and batch size.
        """
        order, lengths = self._by_length(flats)
        ordered = [flats[i] for i in order]
        sums = torch.zeros(len(flats), 2 * k, device=self.device)
        key = stream_key("sjlt", self.seed, 0)
        longest = lengths[0] if lengths else 0
        step = self._sjlt_rows(len(flats))
        for row0 in range(0, longest, step):
            row1 = min(row0 + step, longest)
            active = sum(1 for length in lengths if length > row0)
            chunk = self._chunk(ordered[:active], row0, row1)
            self._add_sjlt_block(key, chunk, row0, row1, k, sums[:active])
        result = torch.empty(len(flats), k, device=self.device)
        result[order] = (sums[:, :k] - sums[:, k:]) / math.sqrt(self.sjlt_s)
        return result.cpu()

    def _sjlt_rows(self, batch: int) -> int:
        """Coordinates per sjlt block: the budget holds the chunk, its copies and the hashes."""
        per_row = 4 * batch * (2 + self.sjlt_s) + 40 * self.sjlt_s
        return max(1, min(self.sjlt_block_rows, int(self.memory_gb * 2**30 / 2 / per_row)))

    def _add_sjlt_block(self, key, chunk: torch.Tensor, row0: int, row1: int, k: int, sums):
        """Add coordinates row0..row1 of chunk [active, rows] into their bins of sums."""
        buckets, negative = sjlt_hash(key, row0, row1, self.sjlt_s, k, self.device)
        bins = (buckets + k * negative).view(-1)
        copies = chunk.repeat_interleave(self.sjlt_s, dim=1) if self.sjlt_s > 1 else chunk
        if self.device.type == "cpu":
            # CPU's scatter_add_ adds each row's terms in index order: deterministic.
            sums.scatter_add_(1, bins.expand(chunk.shape[0], -1), copies)
        else:
            # CUDA's scatter_add_ adds in the order its atomics land.
            sums += sorted_segment_sums(bins, copies, 2 * k)


def sjlt_hash(key: int, row0: int, row1: int, s: int, k: int, device):
    """(int64 [rows, s] output coordinate, bool [rows, s] negative sign) of coordinates rows.

    Coordinate i's l-th copy uses hash word (i, l): the top 32 bits pick the output
    coordinate by multiply-shift (uniform up to 2**-32), bit 0 the sign.
    """
    words = counter_hash(key, row0, row1, 0, s, device)
    negative = words.bitwise_and(1).bool()
    buckets = _shift_right_logical(words, 32).mul_(k).bitwise_right_shift_(32)
    return buckets, negative


def sorted_segment_sums(bins: torch.Tensor, values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """[rows, n_bins]: values [rows, n] summed into bins [n], without atomics.

    A stable sort by bin and a segment sum: the order of the terms in each sum is fixed, so
    the result does not depend on thread scheduling.
    """
    bins, perm = torch.sort(bins, stable=True)
    counts = torch.bincount(bins, minlength=n_bins)
    gathered = values.T.contiguous().index_select(0, perm)
    return torch.segment_reduce(gathered, "sum", lengths=counts, axis=0).T
