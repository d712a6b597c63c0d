"""Seeded random projections of per-example gradients, one class per type.

Adding a type: a `Projection` subclass in its own module, and an entry in `PROJECTIONS`.
Every random number comes from the counter generator (`generator`), so a projection is the
same on every device, for every chunking and batch size. Outputs are scaled so that projected
inner products are unbiased estimates of the full ones.
"""

from gradproj.errors import UserError
from gradproj.projection.base import Projection, default_memory_gb
from gradproj.projection.dense import DenseProjection, NormalProjection, RademacherProjection
from gradproj.projection.generator import (
    GENERATOR,
    counter_hash,
    counter_hash_reference,
    random_block,
    stream_key,
)
from gradproj.projection.kronecker import KroneckerProjection, projected_outer_sum
from gradproj.projection.sjlt import SjltProjection
from gradproj.projection.specs import (
    FULL,
    OutputSpec,
    parse_dims,
    parse_kronecker_dim,
    parse_outputs,
)

PROJECTIONS: dict[str, type[Projection]] = {
    "rademacher": RademacherProjection,
    "normal": NormalProjection,
    "sjlt": SjltProjection,
    "kronecker": KroneckerProjection,
}
PROJ_TYPES = tuple(PROJECTIONS)


def make_projection(proj_type: str, dims, seed: int, shape, **options) -> Projection:
    """The projection of one type to `dims` for gradients of `shape`; options: device,
    memory_gb, and the type's own (sjlt's `s`)."""
    if proj_type not in PROJECTIONS:
        raise UserError(f"unknown projection type {proj_type!r}: use one of {PROJ_TYPES}")
    return PROJECTIONS[proj_type](dims, seed, shape, **options)


def make_projections(specs: list[OutputSpec], seed: int, shape, **options) -> dict:
    """{type: projection to every dim of that type among the specs} (the full gradient aside)."""
    dims: dict[str, list] = {}
    for spec in specs:
        if not spec.is_full:
            dims.setdefault(spec.proj_type, []).append(spec.dim)
    return {t: make_projection(t, d, seed, shape, **options) for t, d in dims.items()}


__all__ = [
    "FULL", "GENERATOR", "PROJECTIONS", "PROJ_TYPES", "DenseProjection", "KroneckerProjection",
    "NormalProjection", "OutputSpec", "Projection", "RademacherProjection", "SjltProjection",
    "counter_hash", "counter_hash_reference", "default_memory_gb", "make_projection",
    "make_projections",
    "parse_dims", "parse_kronecker_dim", "parse_outputs", "projected_outer_sum", "random_block",
    "stream_key",
]  # fmt: skip
