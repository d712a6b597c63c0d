"""What every extraction target shares: its outputs, and how a pass, a shard and a manifest
see it. One subclass per target (embeddings, params, hidden), registered in `TARGETS`."""

from __future__ import annotations

import contextlib

from gradproj.projection import OutputSpec


class Target:
    """One kind of per-example vector computed by an extraction pass, and its outputs.

    A pass runs the model once per batch for all targets: each target's `capture()` is entered
    around the shared backward pass, then `collect` turns what it captured (or the embedding
    gradients, or the mean hidden states) into one payload per example. Per shard,
    `shard_vectors` gives {spec: fp32 [n, width] matrix, or a list of ragged [length, width]
    gradients} of the kept examples, which `gradproj.store` writes.
    """

    name: str
    needs_backward = True  # the shared pass differentiates the loss
    needs_hidden = False  # the shared pass keeps mean last hidden states

    def __init__(self, specs: list[OutputSpec]):
        self.specs = list(specs)

    def capture(self) -> contextlib.AbstractContextManager:
        """Hooks around the shared pass; what the context yields is passed to `collect`."""
        return contextlib.nullcontext()

    def collect(self, batch, captured, embedding_grads, hidden) -> list:
        raise NotImplementedError

    def norm(self, payload) -> float:
        """The example's recorded norm (zero: the example is skipped)."""
        return float(payload.double().norm())

    def shard_vectors(self, payloads: list) -> dict:
        raise NotImplementedError

    def header(self, spec: OutputSpec) -> dict:
        raise NotImplementedError

    def width(self, spec: OutputSpec) -> int:
        """Length of one stored row: an example's vector, or a row of a ragged gradient."""
        raise NotImplementedError
