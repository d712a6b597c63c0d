"""--target embeddings: d(loss)/d(input embeddings), `[length, hidden]` per example, stored
ragged as it is or projected (a [max_seq_length, hidden] layout, zero past the length)."""

from __future__ import annotations

import torch

from gradproj.projection import FULL, OutputSpec, make_projections
from gradproj.targets.base import Target


class EmbeddingTarget(Target):
    name = "embeddings"

    def __init__(self, specs, hidden_size: int, max_seq_length: int, seed: int, device, memory_gb):
        super().__init__(specs)
        self.hidden_size = hidden_size
        shape = (max_seq_length, hidden_size)
        self.projections = make_projections(
            self.specs, seed, shape, device=device, memory_gb=memory_gb
        )

    def collect(self, batch, captured, embedding_grads, hidden) -> list[torch.Tensor]:
        return embedding_grads

    def shard_vectors(self, grads: list[torch.Tensor]) -> dict:
        vectors = {FULL: grads}
        for proj_type, projection in self.projections.items():
            by_k = projection.project_batch(grads) if grads else {}
            for spec in self.specs:
                if spec.proj_type == proj_type:
                    vectors[spec] = by_k.get(spec.k, torch.zeros(0, spec.k))
        return vectors

    def width(self, spec: OutputSpec) -> int:
        return self.hidden_size if spec.is_full else spec.k

    def header(self, spec: OutputSpec) -> dict:
        if spec.is_full:
            return {"kind": "full", "projection": None}
        projection = self.projections[spec.proj_type].describe() | {"dim": spec.dim}
        return {"kind": "projected", "projection": projection}
