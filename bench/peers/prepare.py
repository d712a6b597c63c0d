"""Hand the peers exactly gradproj's work (run with the gradproj venv).

Writes OUT/data.json: the bundled model's local directory, and the train and test examples of
the ground truth, in its order, tokenized by `gradproj.data.tokenize(tokenizer, row, index,
'sft', max_seq_length)`: ids, token ids and labels (-100 where the loss does not look). Every
peer reads this file, so every method sees the same examples and the same loss.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gradproj import data
from gradproj.models import load_tokenizer, resolve_checkpoint
from gradproj.truth import load_ground_truth


def tokenized(tokenizer, dataset: str, split: str, ids: list[str], max_seq_length: int) -> list:
    rows = data.load_split(dataset, split)
    by_id = {}
    for index, row in enumerate(rows):
        example = data.tokenize(tokenizer, row, index, "sft", max_seq_length)
        by_id[example.id] = example
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise SystemExit(f"{dataset} lacks the ground truth's ids {missing[:3]}")
    out = []
    for example_id in ids:
        example = by_id[example_id]
        if data.label_positions(example, "sft") == 0:
            raise SystemExit(f"{example_id} has no label token within {max_seq_length}")
        out.append(
            {"id": example.id, "index": example.index, "input_ids": example.input_ids,
             "labels": example.labels}
        )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--train_dataset", default="examples/data/train.jsonl")
    parser.add_argument("--test_dataset", default="examples/data/test.jsonl")
    parser.add_argument("--ground_truth", default="examples/ground_truth.safetensors")
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--limit", type=int, default=0, help="keep the first N train and test")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    truth = load_ground_truth(args.ground_truth)
    checkpoint = resolve_checkpoint(args.model, 0)
    tokenizer = load_tokenizer(checkpoint)
    train_ids, test_ids = truth.train_ids, truth.test_ids
    if args.limit:
        train_ids, test_ids = train_ids[: args.limit], test_ids[: args.limit]
    record = {
        "model": args.model,
        "model_dir": str(Path(checkpoint.source).resolve()),
        "checkpoint": checkpoint.name,
        "max_seq_length": args.max_seq_length,
        "paradigm": "sft",
        "loss": "per example: mean cross-entropy over its label tokens (causal shift)",
        "pad_token_id": tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        "train": tokenized(tokenizer, args.train_dataset, "train", train_ids, args.max_seq_length),
        "test": tokenized(tokenizer, args.test_dataset, "test", test_ids, args.max_seq_length),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(record))
    print(f"{out / 'data.json'}: {len(record['train'])} train, {len(record['test'])} test")


if __name__ == "__main__":
    main()
