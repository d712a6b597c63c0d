"""Batched, unpadded embedding gradients equal the original one-at-a-time padded computation."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from gradproj import data
from gradproj.gradients import embedding_gradients
from tests.conftest import conversations

MAX_LEN = 48


def reference_gradient(model, ex: data.Example, causal: bool, pad_id: int) -> torch.Tensor:
    """As the original: one example padded to max_seq_length, HF's own loss, autograd."""
    pad = MAX_LEN - ex.length
    ids = torch.tensor([ex.input_ids + [pad_id] * pad])
    labels = torch.tensor([ex.labels + [data.IGNORE] * pad])
    mask = torch.tensor([[1] * ex.length + [0] * pad])
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    (grad,) = torch.autograd.grad(out.loss, embeds)
    return grad[0]


def tokenized(tokenizer, rows, paradigm):
    examples = [data.tokenize(tokenizer, r, i, paradigm, MAX_LEN, "0") for i, r in enumerate(rows)]
    return [e for e in examples if data.label_positions(e, paradigm) > 0]


def assert_close_to_reference(model, examples, causal, pad_id, batch_tokens):
    for batch in data.batches_by_tokens(examples, batch_tokens):
        for ex, g in zip(batch, embedding_gradients(model, batch, causal, pad_id), strict=True):
            ref = reference_gradient(model, ex, causal, pad_id)
            assert torch.all(ref[ex.length :] == 0), "padded positions must have zero gradient"
            scale = ref.abs().max()
            assert (g - ref[: ex.length]).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("paradigm", ["sft", "pre"])
def test_batched_equals_padded_reference(tiny_llama, paradigm):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data.ensure_chat_template(tokenizer)
    rows = conversations(10, long_every=4)  # includes examples longer than MAX_LEN
    examples = tokenized(tokenizer, rows, paradigm)
    assert max(e.length for e in examples) == MAX_LEN and len({e.length for e in examples}) > 3
    assert_close_to_reference(model, examples, True, tokenizer.pad_token_id, batch_tokens=200)


def test_mlm_batched_equals_padded_reference(tiny_bert):
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = [
        {"id": f"d{i}", "text": " ".join(["water boils at one hundred degrees"] * (i + 1))}
        for i in range(5)
    ]
    examples = tokenized(tokenizer, rows, "mlm")
    assert_close_to_reference(model, examples, False, tokenizer.pad_token_id, batch_tokens=120)


@pytest.mark.slow
def test_real_model_batched_equals_padded_reference():
    """SmolLM2's real vocabulary and logits, where a layout-dependent loss kernel drifted 4e-4."""
    from gradproj import models

    checkpoint = models.resolve_checkpoint("bundled:smollm2-135m-instruct", 0)
    tokenizer = models.load_tokenizer(checkpoint)
    model = models.load_model(checkpoint, "sft", torch.float32, "cpu")
    rows = [{"messages": [
        {"role": "user", "content": "Name three primary colours" + " and why" * i + "."},
        {"role": "assistant", "content": "Red, yellow and blue: mixing them gives other hues."},
    ]} for i in range(3)]  # fmt: skip
    examples = tokenized(tokenizer, rows, "sft")
    assert_close_to_reference(model, examples, True, tokenizer.pad_token_id, batch_tokens=4096)
