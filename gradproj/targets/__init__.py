"""Extraction targets behind one interface (`Target`), and the pass that serves them all.

One pass over a batch runs the model once, forward and backward, for every target listed:
the parameter target's hooks sit on that pass, the embedding target takes its input gradient,
and the hidden target its mean last hidden states.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from gradproj.gradients import (
    embedding_gradients,
    mean_hidden_states_captured,
    mean_last_hidden_states,
)
from gradproj.projection import OutputSpec
from gradproj.targets.base import Target
from gradproj.targets.embeddings import EmbeddingTarget
from gradproj.targets.hidden import HiddenTarget
from gradproj.targets.params import ParamsTarget

TARGET_NAMES = ("embeddings", "params", "hidden")


@dataclass
class TargetOptions:
    seed: int
    device: str
    memory_gb: float | None
    max_seq_length: int
    batch_tokens: int
    shard_examples: int
    modules: list[str] | None = None
    include_lm_head: bool = False


def make_target(name: str, model, specs: list[OutputSpec], options: TargetOptions) -> Target:
    hidden_size = model.get_input_embeddings().weight.shape[1]
    if name == "hidden":
        return HiddenTarget(hidden_size)
    if name == "params":
        return ParamsTarget(
            model, options.modules, options.include_lm_head, specs, options.seed,
            options.device, options.memory_gb, options.batch_tokens, options.shard_examples,
        )  # fmt: skip
    return EmbeddingTarget(
        specs, hidden_size, options.max_seq_length, options.seed, options.device,
        options.memory_gb,
    )  # fmt: skip


def run_batch(targets: list[Target], model, batch, causal: bool, pad_id: int) -> list[list]:
    """One pass of the model over a batch for every target: each target's payloads."""
    backward = any(target.needs_backward for target in targets)
    wants_hidden = any(target.needs_hidden for target in targets)
    grads = hidden = None
    with contextlib.ExitStack() as stack:
        captured = [stack.enter_context(target.capture()) for target in targets]
        if backward and wants_hidden:  # the hidden states of the same forward
            hidden = stack.enter_context(mean_hidden_states_captured(model, batch))
        if backward:
            grads = embedding_gradients(model, batch, causal, pad_id)
    if wants_hidden and not backward:
        hidden = mean_last_hidden_states(model, batch, pad_id)
    return [
        target.collect(batch, capture, grads, hidden)
        for target, capture in zip(targets, captured, strict=True)
    ]


__all__ = [
    "TARGET_NAMES", "EmbeddingTarget", "HiddenTarget", "ParamsTarget", "Target",
    "TargetOptions", "make_target", "run_batch",
]  # fmt: skip
