"""What an extraction writes, parsed once at the command's edge: the full gradient, or a
projection type with its dim (k, or k_out x k_in for kronecker)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gradproj.errors import UserError


@dataclass(frozen=True)
class OutputSpec:
    """One output of an extraction pass, each written to its own run directory."""

    proj_type: str | None  # None: the full gradient
    dim: int | str | None = None  # k, or "k_out x k_in" (kronecker only) as the user wrote it

    @property
    def is_full(self) -> bool:
        return self.proj_type is None

    @property
    def name(self) -> str:
        """The run directory's variant: `full`, `rademacher_8192`, `kronecker_16x16`."""
        return "full" if self.is_full else f"{self.proj_type}_{self.dim}"

    @property
    def factors(self) -> tuple[int, int] | None:
        """(k_out, k_in) of a "k_out x k_in" dim, else None."""
        return parse_kronecker_dim(self.dim) if isinstance(self.dim, str) else None

    @property
    def k(self) -> int:
        """The length of one projected block: k, or k_out * k_in."""
        factors = self.factors
        return factors[0] * factors[1] if factors else int(self.dim)


FULL = OutputSpec(None)


def parse_dims(spec) -> list[int | str]:
    """'8192,16384' or [8192] -> [8192, 16384]; 'full' and 'k1xk2' may stand among them."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    dims = []
    for item in items:
        item = str(item).strip()
        if item == "full":
            dims.append("full")
            continue
        if not re.fullmatch(r"\d+(x\d+)?", item) or int(item.split("x")[0]) < 1:
            raise UserError(f"--proj_dim {item!r}: each dim must be an integer >= 1 (or 'full')")
        dims.append(item if "x" in item else int(item))
    if not dims:
        raise UserError("--proj_dim is empty")
    return list(dict.fromkeys(dims))


def parse_outputs(dims: list[int | str], proj_types: list[str]) -> list[OutputSpec]:
    """Every (type, dim) pair of the parsed --proj_dim and --proj_type, and "full" if listed."""
    specs = []
    for proj_type in proj_types:
        for dim in dims:
            if dim == "full":
                specs.append(FULL)
                continue
            if isinstance(dim, str) and proj_type != "kronecker":
                raise UserError(
                    f"--proj_dim {dim!r}: 'k_out x k_in' is a kronecker dim; give "
                    f"{proj_type} an integer"
                )
            specs.append(OutputSpec(proj_type, dim))
    return list(dict.fromkeys(specs))


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
