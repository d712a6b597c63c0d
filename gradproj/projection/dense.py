"""Dense projections: every coordinate times a whole row of a seeded +-1 or N(0, 1) matrix."""

import math
from collections.abc import Sequence

import torch

from gradproj.errors import UserError
from gradproj.projection.base import Projection
from gradproj.projection.generator import (
    _FILL,
    _MAX_WORD,
    _NORMALS_PER_WORD,
    _SIGN_BITS_PER_WORD,
    stream_key,
)

# Working memory per generated entry, sized for the unfused fallback's int64 temporaries.
_BYTES_PER_ENTRY = 24
# Preferred block shapes: on CPU a block that fits the last-level cache with the matmul
# reading it; on CUDA large blocks, so that kernel launches do not dominate.
_PREFERRED_BLOCK = {"cpu": (2048, 2048), "cuda": (16384, 65536)}


class DenseProjection(Projection):
    """R [D, k] with entries from the counter generator, generated block by block, never whole."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.block_rows, self.block_cols = self._block_shape(*_PREFERRED_BLOCK[self.device.type])

    def _block_shape(self, preferred_rows: int, preferred_cols: int) -> tuple[int, int]:
        """Block of the random matrix generated at once: as preferred, shrunk to the budget."""
        budget = self.memory_gb * 2**30
        cols = min(preferred_cols, _round_up(self.dims[-1], _SIGN_BITS_PER_WORD))
        rows = max(1, min(preferred_rows, self.shape[0] * self.shape[1]))
        while rows * cols * _BYTES_PER_ENTRY > budget / 2 and rows > 64:
            rows //= 2
        while rows * cols * _BYTES_PER_ENTRY > budget / 2 and cols > 64:
            cols //= 2
        return rows, cols

    def block_bytes(self) -> int:
        return self.block_rows * self.block_cols * _BYTES_PER_ENTRY

    def project_batch(self, grads: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        full = self._dense_columns(self._flatten_all(grads), self.dims[-1])
        return {k: full[:, :k] / math.sqrt(k) for k in self.dims}

    def _dense_columns(self, flats: list[torch.Tensor], k: int) -> torch.Tensor:
        """fp32 CPU [B, k]: the unscaled product of each gradient with the first k columns."""
        order, lengths = self._by_length(flats)
        ordered = [flats[i] for i in order]
        out_t = torch.zeros(k, len(flats), device=self.device)
        fill, per_word = _FILL[self.proj_type]
        key = stream_key(self.proj_type, self.seed, 0)
        exact_bf16 = self._use_exact_bf16()
        block_dtype = torch.bfloat16 if exact_bf16 else torch.float32
        block = torch.empty(
            self.block_rows * self.block_cols, device=self.device, dtype=block_dtype
        )
        longest = lengths[0] if lengths else 0
        for row0 in range(0, longest, self.block_rows):
            row1 = min(row0 + self.block_rows, longest)
            # Rows past an example's length are zero: leave those examples out of this block.
            active = sum(1 for length in lengths if length > row0)
            chunk = self._chunk(ordered[:active], row0, row1)
            pieces = _split_bf16(chunk) if exact_bf16 else None
            for col0 in range(0, k, self.block_cols):
                col1 = min(col0 + self.block_cols, k)
                words = (col0 // per_word, -(-col1 // per_word))
                width = (words[1] - words[0]) * per_word
                matrix_t = block[: width * (row1 - row0)].view(width, row1 - row0)
                fill(key, row0, row1, words[0], words[1], matrix_t)
                target = out_t[col0:col1, :active]
                if exact_bf16:
                    target += _exact_sign_product(matrix_t[: col1 - col0], pieces)
                else:
                    target.addmm_(matrix_t[: col1 - col0], chunk.T)
        result = torch.empty(len(flats), k, device=self.device)
        result[order] = out_t.T
        return result.cpu()

    def _use_exact_bf16(self) -> bool:
        """Whether to multiply +-1 signs on tensor cores (CUDA only: CPU bf16 is no faster)."""
        return False


class RademacherProjection(DenseProjection):
    proj_type = "rademacher"

    def _use_exact_bf16(self) -> bool:
        return self.device.type == "cuda" and _bf16_matmul_has_fp32_output(self.device)


class NormalProjection(DenseProjection):
    proj_type = "normal"

    def _check_arguments(self) -> None:
        super()._check_arguments()
        if self.dims[-1] > _MAX_WORD * _NORMALS_PER_WORD:
            raise UserError(f"normal projection dim at most {_MAX_WORD * 2}, got {self.dims[-1]}")


def _split_bf16(chunk: torch.Tensor) -> torch.Tensor:
    """bf16 [3 * B, rows] hi, mid, lo with hi + mid + lo == chunk to ~2**-24 relative."""
    hi = chunk.to(torch.bfloat16)
    rest = chunk - hi.float()  # exact: a float minus its rounding
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.float()).to(torch.bfloat16)
    return torch.cat([hi, mid, lo])


def _exact_sign_product(signs_t: torch.Tensor, pieces: torch.Tensor) -> torch.Tensor:
    """fp32 [cols, B]: signs_t @ (hi + mid + lo)^T, each bf16 product exact, fp32 accumulation.

    +-1 is exact in bf16 and an fp32 value is exactly three bf16 pieces, so three tensor-core
    products summed in fp32 equal an fp32 matmul up to fp32 rounding, at bf16 speed.
    """
    products = torch.mm(signs_t, pieces.T, out_dtype=torch.float32)
    hi, mid, lo = products.chunk(3, dim=1)
    return hi + (mid + lo)


_BF16_FP32_OUTPUT: dict[str, bool] = {}


def _bf16_matmul_has_fp32_output(device: torch.device) -> bool:
    """Whether this torch can multiply bf16 matrices into an fp32 result (torch.mm out_dtype)."""
    name = str(device)
    if name not in _BF16_FP32_OUTPUT:
        probe = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        try:
            torch.mm(probe, probe, out_dtype=torch.float32)
            _BF16_FP32_OUTPUT[name] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _BF16_FP32_OUTPUT[name] = False
    return _BF16_FP32_OUTPUT[name]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
