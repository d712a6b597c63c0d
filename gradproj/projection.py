"""Seeded random projections of per-example gradients: dense, sparse JL and Kronecker.

Every random number is a pure function of (seed, stream, row, column) through a counter-based
generator (splitmix64's output function applied to a packed counter), written with torch
integer ops, so the matrix is the same on every device, for every chunking and batch size, and
the first k columns of a wide matrix are the matrix for k (prefix consistency).

Outputs are scaled so that projected inner products are unbiased estimates of the full ones.
"""

import math
import sys
from collections.abc import Sequence

import torch

from gradproj.errors import UserError

PROJ_TYPES = ("rademacher", "normal", "sjlt", "kronecker")
DENSE_TYPES = ("rademacher", "normal")
GENERATOR = {"name": "splitmix64-counter", "version": 1}

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# The counter packs (row, column word) as row << 24 | word: injective, so no two entries of one
# stream share a counter, as long as row < 2**39 and word < 2**24.
_WORD_BITS = 24
_MAX_ROW = 1 << (63 - _WORD_BITS)
_MAX_WORD = 1 << _WORD_BITS
# One tag per use of the generator, so that no two uses share a stream of numbers.
_TAGS = {"rademacher": 1, "normal": 2, "sjlt": 3, "kron_left": 4, "kron_right": 5}
_SIGN_BITS_PER_WORD = 64
_NORMALS_PER_WORD = 2
_ANGLE_BITS = 24
# Working memory per generated entry, sized for the unfused fallback's int64 temporaries.
_BYTES_PER_ENTRY = {"rademacher": 24, "normal": 24}
_MAX_SJLT_S = 256


def _to_int64(value: int) -> int:
    """The signed 64-bit integer with the same two's-complement bits as `value` mod 2**64."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def mix64(value: int) -> int:
    """splitmix64's output function on a Python int (the reference the torch version matches)."""
    value &= _MASK64
    value = ((value ^ (value >> 30)) * _MIX1) & _MASK64
    value = ((value ^ (value >> 27)) * _MIX2) & _MASK64
    return value ^ (value >> 31)


def stream_key(tag: str, seed: int, stream: int) -> int:
    """The 64-bit key of one (use, seed, stream); distinct inputs give unrelated keys."""
    key = mix64(_TAGS[tag] * _GOLDEN)
    key = mix64(key ^ (seed & _MASK64))
    return mix64(key ^ mix64((stream & _MASK64) + _GOLDEN))


def counter_hash_reference(key: int, row: int, word: int) -> int:
    """One hash word in plain Python: splitmix64's value number (row << 24 | word) for `key`."""
    counter = (row << _WORD_BITS) | word
    return mix64(key + counter * _GOLDEN)


def _shift_right_logical(values: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking off the copied sign bits makes it logical.
    return (values >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(values: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 (multiplication wraps mod 2**64)."""
    for shift, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        values = values ^ _shift_right_logical(values, shift)
        if multiplier is not None:
            values = values * _to_int64(multiplier)
    return values


def counter_hash(key: int, row0: int, row1: int, word0: int, word1: int, device) -> torch.Tensor:
    """int64 [row1-row0, word1-word0]: hash words of rows [row0, row1) and words [word0, word1)."""
    row_part, word_part = _counter_parts(key, row0, row1, word0, word1, device)
    return _mix64(row_part[:, None] + word_part[None, :])


def _counter_parts(key: int, row0: int, row1: int, word0: int, word1: int, device):
    """int64 1-D parts whose outer sum is key + (row << 24 | word) * golden (mod 2**64)."""
    if not (0 <= row0 <= row1 <= _MAX_ROW and 0 <= word0 <= word1 <= _MAX_WORD):
        raise ValueError(f"counter out of range: rows {row0}..{row1}, words {word0}..{word1}")
    rows = torch.arange(row0, row1, dtype=torch.int64, device=device)
    words = torch.arange(word0, word1, dtype=torch.int64, device=device)
    row_part = rows.mul_(_to_int64(_GOLDEN << _WORD_BITS)).add_(_to_int64(key))
    return row_part, words.mul_(_to_int64(_GOLDEN))


# The random matrix R [D, k] is generated transposed, as blocks of R^T [columns, rows]: the
# product R^T @ g^T then runs about a third faster on CPU than g @ R (no packing of the block),
# and each hash word's entries lie in distinct contiguous rows of R^T, so one fused kernel
# stores them with full-width vector writes.


def signs_(words: torch.Tensor, out_t: torch.Tensor) -> None:
    """out_t [64 * words, rows]: row 64w + t is -1 where bit t of words[w] is set, else +1."""
    shifts = torch.arange(_SIGN_BITS_PER_WORD, device=words.device)
    bits = (words[:, None, :] >> shifts[None, :, None]) & 1
    out_t.view(words.shape[0], _SIGN_BITS_PER_WORD, words.shape[1]).copy_(1 - 2 * bits)


def box_muller_(
    word_part: torch.Tensor, row_part: torch.Tensor, cos_t: torch.Tensor, sin_t: torch.Tensor
) -> None:
    """r cos(theta) into cos_t and r sin(theta) into sin_t [words, rows] from hash words.

    u1 comes from bits 41..63 (odd numerator, so 0 < u1 < 1 exactly in fp32), theta from bits
    0..23. Written so that torch.compile fuses it into one kernel: the angle is reduced exactly
    in integer turns and its sine and cosine are short polynomials, not libm's general ones.
    """
    words = _mix64(word_part[:, None] + row_part[None, :])
    odd_numerator = _shift_right_logical(words, 41).mul(2).add(1)
    radius = torch.sqrt(torch.log(odd_numerator.to(torch.float32) * 2.0**-24) * -2.0)
    cos, sin = _cos_sin_of_turns(words.bitwise_and((1 << _ANGLE_BITS) - 1).to(torch.int32))
    cos_t.copy_(radius * cos)
    sin_t.copy_(radius * sin)


def _cos_sin_of_turns(turns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin) of 2 pi turns / 2**24 for int32 turns, to within 2e-7 absolute.

    The nearest quarter turn q is split off exactly in integers; the rest, at most an eighth of a
    turn, goes through Taylor polynomials (truncation error below 2e-9 at pi/4), and q picks
    which of the two and its sign.
    """
    quarter = 1 << (_ANGLE_BITS - 2)
    q = (turns + quarter // 2) >> (_ANGLE_BITS - 2)
    x = (turns - q * quarter).to(torch.float32) * (2 * math.pi * 2.0**-_ANGLE_BITS)
    z = x * x
    sin = x * (1 + z * (-1 / 6 + z * (1 / 120 + z * (-1 / 5040 + z * (1 / 362880)))))
    cos = 1 + z * (-1 / 2 + z * (1 / 24 + z * (-1 / 720 + z * (1 / 40320 + z * (-1 / 3628800)))))
    q = q & 3
    odd = (q & 1) == 1
    first, second = torch.where(odd, sin, cos), torch.where(odd, cos, sin)
    return torch.where((q == 1) | (q == 2), -first, first), torch.where(q >= 2, -second, second)


class Fused:
    """A torch function compiled into one kernel by torch.compile on first use.

    Where compiling fails (no C++ compiler on CPU, no Triton on CUDA), it warns once and runs the
    same function op by op: the same numbers to fp32 rounding, several times slower.
    """

    def __init__(self, function):
        self.function = function
        self.kernel = None

    def __call__(self, *args: torch.Tensor) -> None:
        if self.kernel is None:
            self.kernel = torch.compile(self.function, dynamic=True)
        if self.kernel is self.function:
            return self.function(*args)
        try:
            return self.kernel(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure has the same remedy
            self.kernel = self.function
            lines = str(error).strip().splitlines() or [type(error).__name__]
            print(
                f"warning: torch.compile failed ({lines[0]}); random matrices are generated "
                "unfused, several times slower (it needs a C++ compiler on CPU, Triton on CUDA)",
                file=sys.stderr,
            )
            return self.function(*args)


_signs = Fused(signs_)
_box_muller = Fused(box_muller_)


def _rademacher_t(key: int, row0: int, row1: int, word0: int, word1: int, out_t: torch.Tensor):
    """+-1 into out_t [64 * words, rows]: R[i, 64w + t] is -1 iff bit t of word (i, w) is set.

    One 64-bit hash serves 64 entries, which is what makes sign generation cheaper than the
    matmul it feeds.
    """
    row_part, word_part = _counter_parts(key, row0, row1, word0, word1, out_t.device)
    _signs(_mix64(word_part[:, None] + row_part[None, :]), out_t)


def _normal_t(key: int, row0: int, row1: int, word0: int, word1: int, out_t: torch.Tensor):
    """N(0, 1) into out_t [2 * words, rows]: R[i, 2w] and R[i, 2w + 1] from word (i, w)."""
    row_part, word_part = _counter_parts(key, row0, row1, word0, word1, out_t.device)
    _box_muller(word_part, row_part, out_t[0::2], out_t[1::2])


_FILL = {
    "rademacher": (_rademacher_t, _SIGN_BITS_PER_WORD),
    "normal": (_normal_t, _NORMALS_PER_WORD),
}


def random_block(
    kind: str, seed: int, stream: int, row0: int, row1: int, col0: int, col1: int, device="cpu"
) -> torch.Tensor:
    """fp32 [row1-row0, col1-col0] block of the random matrix of (kind, seed, stream).

    Entry (i, j) is a pure function of (kind, seed, stream, i, j): +-1 for "rademacher",
    N(0, 1) for "normal". Unscaled.
    """
    if kind not in _FILL:
        raise UserError(f"unknown random matrix kind {kind!r}: use 'rademacher' or 'normal'")
    return _random_block(kind, stream_key(kind, seed, stream), row0, row1, col0, col1, device)


def _random_block(kind: str, key: int, row0: int, row1: int, col0: int, col1: int, device):
    fill, per_word = _FILL[kind]
    word0, word1 = col0 // per_word, -(-col1 // per_word)
    block_t = torch.empty((word1 - word0) * per_word, row1 - row0, device=device)
    fill(key, row0, row1, word0, word1, block_t)
    skip = col0 - word0 * per_word
    return block_t[skip : skip + col1 - col0].T.contiguous()


def parse_kronecker_dim(spec: str | int) -> tuple[int, int]:
    """(k1, k2) from "k1xk2", or the most balanced factorization k1 <= k2 of an int k."""
    text = str(spec).strip().lower()
    try:
        if "x" in text:
            k1, k2 = (int(part) for part in text.split("x"))
        else:
            k1, k2 = _balanced_factors(int(text))
    except ValueError:
        raise UserError(f"bad kronecker dim {spec!r}: give an integer k or 'k1xk2'") from None
    if k1 < 1 or k2 < 1:
        raise UserError(f"bad kronecker dim {spec!r}: factors must be at least 1")
    return k1, k2


def _balanced_factors(k: int) -> tuple[int, int]:
    if k < 1:
        raise ValueError
    k1 = math.isqrt(k)
    while k % k1:
        k1 -= 1
    return k1, k // k1


def _fitting_factors(k: int, rows: int, cols: int) -> tuple[int, int] | None:
    """The most balanced (k1, k2) with k1 * k2 = k, k1 <= rows and k2 <= cols, or None."""
    pairs = [(d, k // d) for d in range(1, math.isqrt(k) + 1) if k % d == 0]
    pairs += [(b, a) for a, b in pairs]
    fitting = [(a, b) for a, b in pairs if a <= rows and b <= cols]
    return min(fitting, key=lambda ab: abs(math.log(ab[0] / ab[1])), default=None)


def _default_memory_gb(device: torch.device) -> float:
    """Working memory of the projector: 1 GiB on CPU, a quarter of a GPU's memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 4 / 2**30
    return 1.0


# Preferred block shapes: on CPU a block that fits the last-level cache with the matmul
# reading it; on CUDA large blocks, so that kernel launches do not dominate.
_PREFERRED_BLOCK = {"cpu": (2048, 2048), "cuda": (16384, 65536)}
_SJLT_BLOCK_ROWS = 1 << 20


class Projector:
    """Projects ragged per-example gradients [len_i, cols] of a [rows, cols] layout to k dims."""

    def __init__(
        self,
        proj_type: str,
        dims: Sequence[int | str],
        seed: int,
        shape: tuple[int, int],
        device="cpu",
        memory_gb: float | None = None,
        sjlt_s: int = 1,
    ):
        if proj_type not in PROJ_TYPES:
            raise UserError(f"unknown projection type {proj_type!r}: use one of {PROJ_TYPES}")
        self.proj_type = proj_type
        self.seed = int(seed)
        self.shape = (int(shape[0]), int(shape[1]))
        self.device = torch.device(device)
        self.memory_gb = memory_gb if memory_gb is not None else _default_memory_gb(self.device)
        self.sjlt_s = int(sjlt_s)
        self.factors = self._parse_dims(dims)
        self.dims = sorted(self.factors)
        self._check_arguments()
        preferred_rows, preferred_cols = _PREFERRED_BLOCK[self.device.type]
        self.block_rows, self.block_cols = self._block_shape(preferred_rows, preferred_cols)
        self.sjlt_block_rows = _SJLT_BLOCK_ROWS

    def _parse_dims(self, dims: Sequence[int | str]) -> dict[int, tuple[int, int] | None]:
        if isinstance(dims, int | str):
            dims = [dims]
        if not dims:
            raise UserError("no projection dim given: pass at least one, e.g. --proj_dim 8192")
        factors: dict[int, tuple[int, int] | None] = {}
        for spec in dims:
            if self.proj_type == "kronecker":
                k1, k2 = self._kronecker_factors(spec)
                factors[k1 * k2] = (k1, k2)
            else:
                factors[_parse_int_dim(spec)] = None
        return factors

    def _kronecker_factors(self, spec: int | str) -> tuple[int, int]:
        rows, cols = self.shape
        if "x" in str(spec).lower():
            k1, k2 = parse_kronecker_dim(spec)
            if k1 <= rows and k2 <= cols:
                return k1, k2
            raise UserError(
                f"kronecker dim {spec} does not fit the gradient shape {rows}x{cols}: "
                f"need k1 <= {rows} and k2 <= {cols}"
            )
        k = _parse_int_dim(spec)
        fitting = _fitting_factors(k, rows, cols)
        if fitting is None:
            raise UserError(
                f"kronecker dim {k} has no factorization k1*k2 with k1 <= {rows} and "
                f"k2 <= {cols}: choose a dim with such divisors (e.g. a power of 2) or 'k1xk2'"
            )
        return fitting

    def _check_arguments(self) -> None:
        rows, cols = self.shape
        if rows < 1 or cols < 1:
            raise UserError(f"bad gradient shape {self.shape}: both sizes must be at least 1")
        if self.memory_gb <= 0:
            raise UserError(f"--proj_memory_gb must be positive, got {self.memory_gb}")
        if not 1 <= self.sjlt_s <= _MAX_SJLT_S:
            raise UserError(f"sjlt s must be in 1..{_MAX_SJLT_S}, got {self.sjlt_s}")
        if self.proj_type == "normal" and self.dims[-1] > _MAX_WORD * _NORMALS_PER_WORD:
            raise UserError(f"normal projection dim at most {_MAX_WORD * 2}, got {self.dims[-1]}")
        if rows * cols > _MAX_ROW:
            raise UserError(f"gradient of {rows * cols} coordinates exceeds 2**39")

    def _block_shape(self, preferred_rows: int, preferred_cols: int) -> tuple[int, int]:
        """Block of the random matrix generated at once: as preferred, shrunk to the budget."""
        budget = self.memory_gb * 2**30
        per_entry = _BYTES_PER_ENTRY.get(self.proj_type, 0)
        cols = min(preferred_cols, _round_up(self.dims[-1], _SIGN_BITS_PER_WORD))
        rows = max(1, min(preferred_rows, self.shape[0] * self.shape[1]))
        while per_entry and rows * cols * per_entry > budget / 2 and rows > 64:
            rows //= 2
        while per_entry and rows * cols * per_entry > budget / 2 and cols > 64:
            cols //= 2
        return rows, cols

    def describe(self) -> dict:
        """JSON-able description of the projection, for the manifest."""
        description = {
            "type": self.proj_type,
            "dims": self.dims,
            "seed": self.seed,
            "shape": list(self.shape),
            "generator": dict(GENERATOR),
            "scale": "1/sqrt(s)" if self.proj_type == "sjlt" else "1/sqrt(k)",
        }
        if self.proj_type == "sjlt":
            description["s"] = self.sjlt_s
        if self.proj_type == "kronecker":
            description["factorization"] = {str(k): list(f) for k, f in self.factors.items()}
        return description

    def project_batch(self, grads: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """{k: fp32 CPU [B, k]} for every k in dims, each scaled so that E<Pa, Pb> = <a, b>."""
        flats = [self._flatten(grad) for grad in grads]
        self._check_budget(len(flats))
        if self.proj_type in DENSE_TYPES:
            return self._project_dense(flats)
        if self.proj_type == "sjlt":
            return {k: self._project_sjlt(flats, k) for k in self.dims}
        return {k: self._project_kronecker(grads, k) for k in self.dims}

    def _flatten(self, grad: torch.Tensor) -> torch.Tensor:
        rows, cols = self.shape
        if grad.dim() != 2 or grad.shape[1] != cols or grad.shape[0] > rows:
            raise ValueError(f"gradient of shape {tuple(grad.shape)} does not fit {self.shape}")
        return grad.reshape(-1)

    def _check_budget(self, batch: int) -> None:
        output_gb = batch * self.dims[-1] * 4 / 2**30
        if output_gb > self.memory_gb / 2:
            raise UserError(
                f"projecting {batch} examples to {self.dims[-1]} dims needs {output_gb:.2f} GiB "
                f"for the output alone: raise --proj_memory_gb above {2 * output_gb:.2f}"
            )

    def _chunk(self, flats: list[torch.Tensor], row0: int, row1: int) -> torch.Tensor:
        """fp32 [len(flats), row1-row0] on the device: coordinates row0..row1, zero past the end."""
        chunk = torch.empty(len(flats), row1 - row0, device=self.device)
        for i, flat in enumerate(flats):
            piece = flat[row0:row1]
            chunk[i, : piece.numel()] = piece.to(self.device, torch.float32)
            chunk[i, piece.numel() :] = 0
        return chunk

    def _by_length(self, flats: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        """Example order, longest first, and each one's length in that order."""
        order = sorted(range(len(flats)), key=lambda i: -flats[i].numel())
        return order, [flats[i].numel() for i in order]

    def _project_dense(self, flats: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        k_max = self.dims[-1]
        full = self._dense_columns(flats, k_max)
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
        return (
            self.proj_type == "rademacher"
            and self.device.type == "cuda"
            and _bf16_matmul_has_fp32_output(self.device)
        )

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

    def _project_kronecker(self, grads: Sequence[torch.Tensor], k: int) -> torch.Tensor:
        """fp32 CPU [B, k]: vec(A^T G B) / sqrt(k) with A [rows, k1], B [cols, k2] Gaussian."""
        k1, k2 = self.factors[k]
        rows, cols = self.shape
        left = kronecker_factor("kron_left", self.seed, rows, k1, self.device)
        right = kronecker_factor("kron_right", self.seed, cols, k2, self.device)
        out = torch.empty(len(grads), k)
        for i, grad in enumerate(grads):
            grad = grad.to(self.device, torch.float32)
            # Only the first len_i rows of A meet a non-zero row of G.
            product = left[: grad.shape[0]].T @ (grad @ right)
            out[i] = product.reshape(-1).cpu()
        return out / math.sqrt(k)


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


def _parse_int_dim(spec: int | str) -> int:
    try:
        k = int(spec)
    except (TypeError, ValueError):
        raise UserError(f"bad projection dim {spec!r}: give a positive integer") from None
    if k < 1:
        raise UserError(f"bad projection dim {k}: it must be at least 1")
    return k


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


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


def kronecker_factor(tag: str, seed: int, rows: int, k: int, device) -> torch.Tensor:
    """fp32 [rows, k] N(0, 1) factor of the Kronecker projection."""
    return _random_block("normal", stream_key(tag, seed, 0), 0, rows, 0, k, device)
