"""--target hidden: no gradient, each example's last hidden state averaged over its tokens
(the forward pass alone): a representation baseline for the retrieval evaluation."""

from __future__ import annotations

import torch

from gradproj.projection import FULL, OutputSpec
from gradproj.targets.base import Target


class HiddenTarget(Target):
    name = "hidden"
    needs_backward = False
    needs_hidden = True

    def __init__(self, hidden_size: int):
        super().__init__([FULL])
        self.hidden_size = hidden_size

    def collect(self, batch, captured, embedding_grads, hidden) -> list[torch.Tensor]:
        return hidden

    def shard_vectors(self, vectors: list[torch.Tensor]) -> dict:
        return {FULL: torch.stack(vectors) if vectors else torch.zeros(0, self.hidden_size)}

    def width(self, spec: OutputSpec) -> int:
        return self.hidden_size

    def header(self, spec: OutputSpec) -> dict:
        return {"kind": "hidden", "projection": None}
