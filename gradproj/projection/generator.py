"""The counter-based generator behind every projection: seeded random matrices, any block.

Every random number is a pure function of (seed, stream, row, column) through splitmix64's
output function applied to a packed counter, written with torch integer ops, so a matrix is the
same on every device, for every chunking and batch size, and the first k columns of a wide
matrix are the matrix for k (prefix consistency).
"""

import math
import sys

import torch

from gradproj.errors import UserError

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
