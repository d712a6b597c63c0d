"""Per-example loss gradients with respect to the input embeddings, one backward per batch.

The batch loss is the sum of per-example mean losses, and examples do not interact (right
padding, causal or key-masked attention), so the gradient of the batch loss w.r.t. an example's
input embeddings is that example's own gradient. Padded positions carry no label and are masked
as keys, so their gradient is exactly zero and is never returned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradproj.data import IGNORE, Example


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
    token_loss = F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
    )
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
    (grad,) = torch.autograd.grad(loss, embeds)
    return [grad[row, : ex.length].float() for row, ex in enumerate(batch)]
