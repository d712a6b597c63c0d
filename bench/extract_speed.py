"""Embedding-gradient throughput: the original way against gradproj's batched, unpadded way.

The original computed one example at a time, padded to max_seq_length. gradproj sorts examples
by length and batches them unpadded under a token budget. Both use the same frozen model, so
the backward pass computes activation gradients only.

    python bench/extract_speed.py [--n 32] [--n_original 4] [--batch_tokens 1024,8192]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from gradproj import data, models
from gradproj.gradients import embedding_gradients

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "oasst1_tulu_format.jsonl"


def load_rows(n: int) -> list[dict]:
    if SHARED.is_file():
        return [json.loads(line) for line in SHARED.read_text().splitlines()[:n]]
    examples = Path(__file__).resolve().parents[1] / "examples" / "data" / "train.jsonl"
    return [json.loads(line) for line in examples.read_text().splitlines()[:n]]


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - began) / 1e9


def original_gradient(model, ex: data.Example, max_len: int, pad_id: int) -> torch.Tensor:
    pad = max_len - ex.length
    ids = torch.tensor([ex.input_ids + [pad_id] * pad])
    labels = torch.tensor([ex.labels + [data.IGNORE] * pad])
    mask = torch.tensor([[1] * ex.length + [0] * pad])
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    (grad,) = torch.autograd.grad(loss, embeds)
    return grad[0, : ex.length]


def time_original(model, examples, max_len, pad_id):
    began = time.perf_counter()
    grads = {ex.index: original_gradient(model, ex, max_len, pad_id) for ex in examples}
    return time.perf_counter() - began, grads


def time_batched(model, examples, batch_tokens, pad_id):
    began = time.perf_counter()
    grads = {}
    for batch in data.batches_by_tokens(examples, batch_tokens):
        for ex, g in zip(batch, embedding_gradients(model, batch, True, pad_id), strict=True):
            grads[ex.index] = g
    return time.perf_counter() - began, grads


def max_relative_difference(reference: dict, ours: dict) -> float:
    """Over the examples of `reference`: max |ours - reference| / max |reference|."""
    worst = 0.0
    for i, ref in reference.items():
        worst = max(worst, float((ours[i] - ref).abs().max() / ref.abs().max()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bundled:smollm2-135m-instruct")
    p.add_argument("--n", type=int, default=32, help="examples for gradproj")
    p.add_argument("--n_original", type=int, default=4, help="examples for the original way")
    p.add_argument("--max_seq_length", default="1024,4096")
    p.add_argument("--batch_tokens", default="1024", help="token budgets, comma-separated")
    args = p.parse_args()
    torch.manual_seed(0)
    checkpoint = models.resolve_checkpoint(args.model, 0)
    tokenizer = models.load_tokenizer(checkpoint)
    model = models.load_model(checkpoint, "sft", torch.float32, "cpu")
    params = sum(p.numel() for p in model.parameters())
    pad_id = tokenizer.pad_token_id or 0
    rate = matmul_gflops()
    print(f"machine fp32 matmul rate: {rate:.1f} GFLOP/s; model parameters: {params / 1e6:.1f} M")
    print(f"threads: {torch.get_num_threads()}; data: {SHARED if SHARED.is_file() else 'examples'}")
    for max_len in (int(x) for x in args.max_seq_length.split(",")):
        rows = load_rows(args.n)
        examples = [data.tokenize(tokenizer, r, i, "sft", max_len) for i, r in enumerate(rows)]
        examples = [e for e in examples if data.label_positions(e, "sft") > 0]
        subset = examples[: args.n_original]
        t_orig, g_orig = time_original(model, subset, max_len, pad_id)
        orig_rate = len(subset) / t_orig
        lengths = sorted(e.length for e in examples)
        print(
            f"max_seq_length {max_len}: lengths {lengths[0]}-{lengths[-1]} "
            f"(median {lengths[len(lengths) // 2]})\n"
            f"  original: {orig_rate:.3f} ex/s ({len(subset)} examples, {t_orig:.1f} s)"
        )
        for budget in (int(x) for x in args.batch_tokens.split(",")):
            t_tool, g_tool = time_batched(model, examples, budget, pad_id)
            tool_rate = len(examples) / t_tool
            share = 4 * params * sum(lengths) / t_tool / 1e9 / rate
            print(
                f"  gradproj, batch_tokens {budget}: {tool_rate:.3f} ex/s ({len(examples)} "
                f"examples, {t_tool:.1f} s); speedup {tool_rate / orig_rate:.1f}x; share of "
                f"matmul rate (4 x params x tokens) {share:.0%}; max relative gradient "
                f"difference {max_relative_difference(g_orig, g_tool):.2e}"
            )


if __name__ == "__main__":
    main()
