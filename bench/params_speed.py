"""--target params throughput and peak memory against the embedding target and the naive way.

Configurations, each in its own process (so that peak memory is its own):
- embeddings: batched d loss / d input embeddings (the default target, gradients only);
- kronecker: params, every linear layer but the LM head, kronecker 16x16 per layer from hooks;
- dense: params, one small layer, exact per-example gradient projected by the dense engine;
- naive: one backward per example with the weights' requires_grad on, every layer's gradient
  flattened into one vector, dense projection. Its projection is timed on a prefix of the
  coordinates and scaled to all of them (the full product takes hours on a laptop CPU).

    python bench/params_speed.py [--n 6] [--max_seq_length 512] [--device cpu]
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from gradproj import data, models
from gradproj.gradients import embedding_gradients, linear_modules
from gradproj.projection import OutputSpec, make_projection
from gradproj.targets import ParamsTarget, run_batch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "oasst1_tulu_format.jsonl"
CONFIGS = ("embeddings", "kronecker", "dense", "naive")


def load_examples(tokenizer, n: int, max_len: int) -> list[data.Example]:
    rows = [json.loads(line) for line in SHARED.read_text().splitlines()]
    examples = []
    for i, row in enumerate(rows):
        ex = data.tokenize(tokenizer, row, i, "sft", max_len)
        if data.label_positions(ex, "sft") > 0:
            examples.append(ex)
        if len(examples) == n:
            return examples
    return examples


def synthetic_examples(n: int, max_len: int, vocab: int) -> list[data.Example]:
    """Random token sequences of max_len/2..max_len tokens, loss on the second half: timing
    does not depend on the content (for machines without the bundled model and data)."""
    generator = torch.Generator().manual_seed(0)
    examples = []
    for i in range(n):
        length = int(torch.randint(max_len // 2, max_len + 1, (1,), generator=generator))
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        labels = [data.IGNORE] * (length // 2) + ids[length // 2 :]
        examples.append(data.Example(i, f"synthetic_{i}", ids, labels))
    return examples


def load_model(args):
    """The model and tokenizer; --random_weights builds the model from its config.json alone."""
    checkpoint = models.resolve_checkpoint(args.model, 0)
    tokenizer = models.load_tokenizer(checkpoint)
    dtype = models.resolve_dtype(args.dtype, args.device)
    if not args.random_weights:
        return models.load_model(checkpoint, "sft", dtype, args.device), tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint.source)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.requires_grad_(False).eval().to(args.device), tokenizer


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_embeddings(model, examples, args, pad_id) -> None:
    for batch in data.batches_by_tokens(examples, args.batch_tokens):
        embedding_gradients(model, batch, True, pad_id)


def run_params(model, examples, args, pad_id, target: ParamsTarget) -> None:
    for batch in data.batches_by_tokens(examples, args.batch_tokens):
        run_batch([target], model, batch, True, pad_id)


def naive_gradient(model, weights, ex: data.Example) -> torch.Tensor:
    """One example, the weights' own .grad, flattened: the way per-example tools usually go."""
    device = weights[0].device
    ids = torch.tensor([ex.input_ids], device=device)
    labels = torch.tensor([ex.labels], device=device)
    for w in weights:
        w.grad = None
    model(input_ids=ids, labels=labels).loss.backward()
    return torch.cat([w.grad.flatten() for w in weights])


def run_naive(model, examples, args) -> dict:
    weights = [m.weight for _, m in linear_modules(model, None, False)]
    for w in weights:
        w.requires_grad_(True)
    began = time.perf_counter()
    flats = [naive_gradient(model, weights, ex) for ex in examples]
    synchronize(args.device)
    backward_s = time.perf_counter() - began
    dim = flats[0].numel()
    prefix = min(dim, args.naive_prefix)
    projector = make_projection("rademacher", [args.dense_dim], 0, (1, prefix), device=args.device)
    began = time.perf_counter()
    for flat in flats:  # one example at a time, as the gradient comes
        projector.project_batch([flat[None, :prefix]])
    synchronize(args.device)
    projection_s = (time.perf_counter() - began) * dim / prefix
    return {"backward_s": backward_s, "projection_s": projection_s, "params": dim}


def measure(name: str, args) -> dict:
    """Time one configuration on args.n examples after a short warm-up."""
    model, tokenizer = load_model(args)
    pad_id = tokenizer.pad_token_id or 0
    if args.synthetic:
        examples = synthetic_examples(args.n, args.max_seq_length, len(tokenizer))
    else:
        examples = load_examples(tokenizer, args.n, args.max_seq_length)
    first = examples[0]  # a short warm-up: allocator and kernels, outside the timing
    warmup = [data.Example(first.index, first.id, first.input_ids[:64], first.labels[:64])]
    loaded_gb = peak_memory_gb(args.device)
    result = {"config": name, "examples": len(examples)}
    result["tokens"] = sum(e.length for e in examples)
    if name == "naive":
        run_naive(model, warmup, Args(args | {"naive_prefix": 1024}))
        result |= run_naive(model, examples, args)
        seconds = result["backward_s"] + result["projection_s"]
    else:
        work = {"embeddings": lambda ex: run_embeddings(model, ex, args, pad_id)}
        if name != "embeddings":
            patterns = None if name == "kronecker" else [args.dense_module]
            output = (
                OutputSpec("kronecker", "16x16")
                if name == "kronecker"
                else OutputSpec("rademacher", args.dense_dim)
            )
            target = ParamsTarget(
                model, patterns, False, [output], 0, args.device, batch_tokens=args.batch_tokens
            )
            result["params"], result["out_dim"] = target.dim, target.width(output)
            work[name] = lambda ex: run_params(model, ex, args, pad_id, target)
        work[name](warmup)
        synchronize(args.device)
        began = time.perf_counter()
        work[name](examples)
        synchronize(args.device)
        seconds = time.perf_counter() - began
    result |= {
        "seconds": seconds,
        "examples_per_s": len(examples) / seconds,
        "peak_gb": peak_memory_gb(args.device),
        "model_loaded_gb": loaded_gb,
    }
    return result


class Args(dict):
    __getattr__ = dict.__getitem__


def parse_args() -> Args:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bundled:smollm2-135m-instruct")
    p.add_argument("--n", type=int, default=6, help="timed examples per configuration")
    p.add_argument("--max_seq_length", type=int, default=512)
    p.add_argument("--batch_tokens", type=int, default=4096)
    p.add_argument("--dense_module", default="model.layers.0.self_attn.k_proj")
    p.add_argument("--dense_dim", type=int, default=4096)
    p.add_argument("--naive_n", type=int, default=1, help="timed examples of the naive way")
    p.add_argument("--naive_prefix", type=int, default=1 << 20, help="coordinates projected")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", help="model dtype: fp32, bf16")
    p.add_argument("--synthetic", action="store_true", help="random token sequences as data")
    p.add_argument("--random_weights", action="store_true", help="model from config.json only")
    p.add_argument("--only", choices=CONFIGS, help="run one configuration, print JSON")
    return Args(vars(p.parse_args()))


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    if args.only:
        n = args.naive_n if args.only == "naive" else args.n
        print(json.dumps(measure(args.only, Args(args | {"n": n}))))
        return
    results = []
    for name in CONFIGS:
        argv = [sys.executable, __file__, "--only", name]
        for key in ("model", "n", "max_seq_length", "batch_tokens", "dense_module", "dense_dim",
                    "naive_n", "naive_prefix", "device", "dtype"):  # fmt: skip
            argv += [f"--{key}", str(args[key])]
        argv += [f"--{key}" for key in ("synthetic", "random_weights") if args[key]]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print_table(results, args)


def print_table(results: list[dict], args) -> None:
    base = results[0]["seconds"] / results[0]["examples"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n{args.model}, max_seq_length {args.max_seq_length}, {device}, {args.dtype}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print("| configuration | examples | s/example | examples/s | x embeddings | peak GB "
          "| over model GB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in results:
        per = r["seconds"] / r["examples"]
        print(
            f"| {r['config']} | {r['examples']} | {per:.2f} | {r['examples_per_s']:.3f} | "
            f"{per / base:.2f} | {r['peak_gb']:.2f} | {r['peak_gb'] - r['model_loaded_gb']:.2f} |"
        )


if __name__ == "__main__":
    main()
