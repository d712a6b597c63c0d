"""Kronecker projections: vec(A^T G B) / sqrt(k_out k_in) of a [rows, cols] gradient G, with
seeded Gaussian A [rows, k_out] and B [cols, k_in]; never a [rows * cols, k] matrix."""

import math
from collections.abc import Sequence

import torch

from gradproj.errors import UserError
from gradproj.projection.base import Projection, parse_int_dim
from gradproj.projection.generator import _random_block, stream_key
from gradproj.projection.specs import parse_kronecker_dim


class KroneckerProjection(Projection):
    """`keys` (left, right) choose the factors' streams: by default the tags kron_left and
    kron_right (embedding gradients); the parameter target gives each layer its own. Without
    `require_fit`, a factor may be wider than its side of G (the parameter target's layers)."""

    proj_type = "kronecker"

    def __init__(self, *args, keys: tuple[int, int] | None = None, require_fit=True, **kwargs):
        self.require_fit = require_fit
        super().__init__(*args, **kwargs)
        self.keys = keys or (
            stream_key("kron_left", self.seed, 0),
            stream_key("kron_right", self.seed, 0),
        )

    def _parse_dim(self, spec: int | str) -> tuple[int, tuple[int, int]]:
        rows, cols = self.shape
        if "x" in str(spec).lower() or not self.require_fit:
            k1, k2 = parse_kronecker_dim(spec)
            if (k1 <= rows and k2 <= cols) or not self.require_fit:
                return k1 * k2, (k1, k2)
            raise UserError(
                f"kronecker dim {spec} does not fit the gradient shape {rows}x{cols}: "
                f"need k1 <= {rows} and k2 <= {cols}"
            )
        k = parse_int_dim(spec)
        fitting = _fitting_factors(k, rows, cols)
        if fitting is None:
            raise UserError(
                f"kronecker dim {k} has no factorization k1*k2 with k1 <= {rows} and "
                f"k2 <= {cols}: choose a dim with such divisors (e.g. a power of 2) or 'k1xk2'"
            )
        return k, fitting

    def describe(self) -> dict:
        factorization = {str(k): list(f) for k, f in self.factors.items()}
        return super().describe() | {"factorization": factorization}

    def factor_matrices(self, k_out: int, k_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [rows, k_out], B [cols, k_in]) fp32 N(0, 1); the first columns of wider ones."""
        rows, cols = self.shape
        left = _random_block("normal", self.keys[0], 0, rows, 0, k_out, self.device)
        right = _random_block("normal", self.keys[1], 0, cols, 0, k_in, self.device)
        return left, right

    def widest_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factor matrices of the widest k_out and k_in among the dims."""
        k_out = max(f[0] for f in self.factors.values())
        k_in = max(f[1] for f in self.factors.values())
        return self.factor_matrices(k_out, k_in)

    def project_batch(self, grads: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        self._flatten_all(grads)  # checks each shape and the output's memory
        return {k: self._project(grads, k) for k in self.dims}

    def _project(self, grads: Sequence[torch.Tensor], k: int) -> torch.Tensor:
        """fp32 CPU [B, k]: vec(A^T G B) / sqrt(k)."""
        left, right = self.factor_matrices(*self.factors[k])
        out = torch.empty(len(grads), k)
        for i, grad in enumerate(grads):
            grad = grad.to(self.device, torch.float32)
            # Only the first len_i rows of A meet a non-zero row of G.
            product = left[: grad.shape[0]].T @ (grad @ right)
            out[i] = product.reshape(-1).cpu()
        return out / math.sqrt(k)


def projected_outer_sum(
    delta: torch.Tensor, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """fp32 `[B, k_out, k_in]`: A^T (sum_t delta_t x_t^T) B as sum_t (A^T delta_t)(B^T x_t)^T,
    a linear layer's projected per-example weight gradient without forming it.

    delta `[B, T, d_out]`, x `[B, T, d_in]`, left A `[d_out, k_out]`, right B `[d_in, k_in]`.
    """
    return torch.einsum("bto,bti->boi", delta.float() @ left, x.float() @ right)


def _fitting_factors(k: int, rows: int, cols: int) -> tuple[int, int] | None:
    """The most balanced (k1, k2) with k1 * k2 = k, k1 <= rows and k2 <= cols, or None."""
    pairs = [(d, k // d) for d in range(1, math.isqrt(k) + 1) if k % d == 0]
    pairs += [(b, a) for a, b in pairs]
    fitting = [(a, b) for a, b in pairs if a <= rows and b <= cols]
    return min(fitting, key=lambda ab: abs(math.log(ab[0] / ab[1])), default=None)
