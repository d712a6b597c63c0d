"""Per-example loss gradients with respect to the input embeddings, one backward per batch.

The batch loss is the sum of per-example mean losses, and examples do not interact (right
padding, causal or key-masked attention), so the gradient of the batch loss w.r.t. an example's
input embeddings is that example's own gradient. Padded positions carry no label and are masked
as keys, so their gradient is exactly zero and is never returned.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradproj.data import IGNORE, Example
from gradproj.errors import UserError


def pad_batch(batch: list[Example], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded input ids, attention mask and labels, `[B, longest]`."""
    longest = max(e.length for e in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, ex in enumerate(batch):
        ids[row, : ex.length] = torch.tensor(ex.input_ids)
        labels[row, : ex.length] = torch.tensor(ex.labels)
        mask[row, : ex.length] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def per_example_mean_loss(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """`[B]` mean token loss over each example's labels, computed in fp32."""
    if causal:  # position t predicts token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    # Flat [tokens, vocab] layout: on CPU, cross_entropy over a class dim that is not the last
    # one loses about 1e-4 relative (measured on SmolLM2), the flat one matches fp64 to 1e-7.
    token_loss = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape)
    counts = (labels != IGNORE).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def embedding_gradients(
    model, batch: list[Example], causal: bool, pad_id: int = 0
) -> list[torch.Tensor]:
    """d(mean label loss)/d(input embeddings) per example, fp32 `[length, hidden]` each."""
    device = model.get_input_embeddings().weight.device
    ids, mask, labels = pad_batch(batch, pad_id, device)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    loss = per_example_mean_loss(logits, labels, causal).sum()
    # Differentiating w.r.t. the embeddings also makes autograd visit every layer's output,
    # which is what the hooks of the parameter target (`LinearTaps`) need.
    (grad,) = torch.autograd.grad(loss, embeds)
    return [grad[row, : ex.length].float() for row, ex in enumerate(batch)]


def mean_last_hidden_states(model, batch: list[Example], pad_id: int = 0) -> list[torch.Tensor]:
    """Each example's last hidden state averaged over its tokens, fp32 `[hidden]` (--target
    hidden): a representation baseline from the forward pass alone, no loss, no backward."""
    device = model.get_input_embeddings().weight.device
    ids, mask, _ = pad_batch(batch, pad_id, device)
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return token_means(hidden, batch)


def token_means(hidden: torch.Tensor, batch: list[Example]) -> list[torch.Tensor]:
    """fp32 `[hidden]` per example: `[B, T, hidden]` averaged over each example's own tokens."""
    return [hidden[row, : ex.length].float().mean(0) for row, ex in enumerate(batch)]


@contextlib.contextmanager
def mean_hidden_states_captured(model, batch: list[Example]) -> Iterator[list[torch.Tensor]]:
    """Around one pass: what `mean_last_hidden_states` gives, taken from that pass's forward
    (a hook on the base model) instead of a forward of its own."""
    means: list[torch.Tensor] = []

    def keep(module, args, output):
        means.extend(token_means(output.last_hidden_state.detach(), batch))

    handle = model.base_model.register_forward_hook(keep)
    try:
        yield means
    finally:
        handle.remove()


# Parameter gradients of linear layers (--target params)
#
# For a linear layer y_t = W x_t (+ b) at positions t, an example's weight gradient is
# sum_t delta_t x_t^T with delta_t = dL/dy_t. Forward hooks see x, tensor hooks on the output see
# delta, so one batched backward pass that computes activation gradients only (the parameters
# stay frozen) yields every chosen layer's per-example weight gradient, or any projection of it.
# Padded positions have delta = 0 (nothing downstream of them carries a label), so they add
# nothing. Biases are not included.


def linear_modules(
    model, patterns: list[str] | None, include_lm_head: bool
) -> list[tuple[str, torch.nn.Linear]]:
    """The chosen `nn.Linear` layers in module order: those matching a glob (default: all),
    never the LM head unless `include_lm_head`."""
    head = model.get_output_embeddings()
    linears = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    ]
    if patterns:
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in linears):
                raise UserError(
                    f"--modules {pattern!r} matches no linear layer (the LM head is added with "
                    f"--include_lm_head); layers look like {linears[0][0] if linears else '-'}"
                )
        linears = [(n, m) for n, m in linears if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if include_lm_head:
        if not isinstance(head, torch.nn.Linear):
            raise UserError("--include_lm_head: this model's output layer is not an nn.Linear")
        linears.append((_module_name(model, head), head))
    if not linears:
        raise UserError("--target params: the model has no nn.Linear layer to take gradients of")
    return linears


def _module_name(model, wanted) -> str:
    return next(name for name, module in model.named_modules() if module is wanted)


class LinearTaps:
    """Hooks on chosen linear layers, each called once per pass (no layer may be reused).

    `on_input(name, x)` runs in the forward pass with x `[B, T, d_in]`, `on_output_grad(name,
    delta)` in the backward pass with delta `[B, T, d_out]`.
    """

    def __init__(self, modules, on_input, on_output_grad):
        self.modules, self.on_input, self.on_output_grad = modules, on_input, on_output_grad
        self.handles = []

    def __enter__(self):
        for name, module in self.modules:
            self.handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _forward_hook(self, name):
        def hook(module, args, output):
            self.on_input(name, args[0].detach())
            if output.requires_grad:
                output.register_hook(lambda grad: self.on_output_grad(name, grad.detach()))

        return hook


@dataclass
class CapturedBatch:
    """Each chosen layer's inputs and output gradients for one batch, fp32 `[B, T, d]`."""

    modules: list[tuple[str, torch.nn.Linear]]
    inputs: dict[str, torch.Tensor]
    output_grads: dict[str, torch.Tensor]

    def weight_gradients(self, rows: slice) -> torch.Tensor:
        """fp32 `[len(rows), D]`: the examples' weight gradients, flattened row-major
        (`[d_out, d_in]` each) and concatenated in module order."""
        parts = []
        for name, module in self.modules:
            x = self.inputs[name][rows]
            delta = self.output_grads.get(name)
            if delta is None:  # the layer does not influence the loss
                parts.append(x.new_zeros(x.shape[0], module.weight.numel()))
                continue
            parts.append(torch.einsum("bto,bti->boi", delta[rows], x).flatten(1))
        return torch.cat(parts, dim=1)


@contextlib.contextmanager
def linear_layers_captured(modules) -> Iterator[CapturedBatch]:
    """Around one pass (`embedding_gradients`): keeps the chosen layers' inputs and output
    gradients."""
    captured = CapturedBatch(modules, {}, {})

    def keep_input(name, x):
        captured.inputs[name] = x.float()

    def keep_grad(name, delta):
        captured.output_grads[name] = delta.float()

    with LinearTaps(modules, keep_input, keep_grad):
        yield captured


@contextlib.contextmanager
def kronecker_projected(
    modules, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> Iterator[dict[str, torch.Tensor]]:
    """Around one pass: {name: fp32 `[B, k_out, k_in]`}, A^T G B of each example's weight
    gradient G of each chosen layer that influences the loss, unscaled.

    The forward hook keeps only B^T x_t (k_in numbers a position) and the backward hook
    multiplies in A^T delta_t, so no weight-sized tensor is ever formed.
    `factors[name] = (A [d_out, k_out], B [d_in, k_in])`, fp32 on the model's device.
    """
    right_products, out = {}, {}

    def project_input(name, x):
        right_products[name] = x.float() @ factors[name][1]

    def project_grad(name, delta):
        left = delta.float() @ factors[name][0]
        out[name] = torch.einsum("bto,bti->boi", left, right_products.pop(name))

    with LinearTaps(modules, project_input, project_grad):
        yield out
