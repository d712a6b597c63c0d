"""Datasets in, tokenized examples with loss labels out, batched under a token budget."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from gradproj.errors import UserError

IGNORE = -100
PARADIGMS = ("sft", "pre", "mlm")
MLM_PROBABILITY = 0.15

# open-instruct's Tulu format, for tokenizers that bring no chat template of their own.
TULU_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + '\n' }}"
    "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + m['content'] + (eos_token or '') + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_SPLIT = re.compile(r"^([\w.-]+)(\[.*\])?$")


@dataclass
class Example:
    """One tokenized example: `labels` are IGNORE where the loss does not look."""

    index: int
    id: str
    input_ids: list[int]
    labels: list[int]

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def label_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def split_name(split: str) -> str:
    match = _SPLIT.match(split)
    if not match:
        raise UserError(f"split {split!r} is not a split name or slice such as train[0:100]")
    return match.group(1)


def load_split(dataset: str, split: str) -> datasets.Dataset:
    """A local .json/.jsonl/.parquet file, a save_to_disk directory or a hub dataset, sliced."""
    base = split_name(split)
    full = _load_base_split(dataset, base)
    try:
        (instr,) = datasets.ReadInstruction.from_spec(split).to_absolute({base: len(full)})
    except Exception as err:
        raise UserError(f"split slice {split!r} is not valid: {err}") from err
    return full.select(range(instr.from_, instr.to))


def _load_base_split(dataset: str, base: str) -> datasets.Dataset:
    path = Path(dataset)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if base not in loaded:
                raise UserError(f"split {base!r} not in {dataset} (has {', '.join(loaded)})")
            return loaded[base]
        return loaded
    if path.is_file():
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix)
        if builder is None:
            raise UserError(f"{dataset}: use a .json, .jsonl or .parquet file, or a directory")
        try:
            return datasets.load_dataset(builder, data_files={base: str(path)}, split=base)
        except Exception as err:
            raise UserError(f"cannot read {dataset}: {_first_line(err)}") from err
    return _load_hub_split(dataset, base)


def _load_hub_split(dataset: str, base: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(dataset, split=base)
    except ValueError as err:
        if "split" in str(err).lower():
            raise UserError(f"split {base!r} does not exist in {dataset}") from err
        raise UserError(f"cannot load dataset {dataset}: {_first_line(err)}") from err
    except Exception as err:
        raise UserError(
            f"dataset {dataset!r} is neither a local path nor reachable on the hub "
            f"({_first_line(err)}); check the name, or unset HF_HUB_OFFLINE to download"
        ) from err


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def example_id(row: dict, index: int) -> str:
    for key in ("id", "prompt_id"):
        if row.get(key) not in (None, ""):
            return str(row[key])
    return str(index)


def conversation(row: dict) -> list[dict]:
    """The `messages` of a Tulu v2 or UltraChat row; a list nested one level is flattened."""
    messages = row.get("messages")
    if not messages:
        raise UserError("the dataset has no 'messages' column; sft needs chat conversations")
    if isinstance(messages[0], list):
        messages = [m for group in messages for m in group]
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_columns(ds: datasets.Dataset, paradigm: str) -> None:
    if paradigm not in PARADIGMS:
        raise UserError(f"unknown paradigm {paradigm!r}; use one of {', '.join(PARADIGMS)}")
    cols = set(ds.column_names)
    if paradigm == "sft" and "messages" not in cols:
        raise UserError(f"sft needs a 'messages' column; the dataset has {sorted(cols)}")
    if paradigm in ("pre", "mlm") and not cols & {"text", "messages"}:
        raise UserError(
            f"{paradigm} needs a 'text' or 'messages' column; the dataset has {sorted(cols)}"
        )


def ensure_chat_template(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = TULU_CHAT_TEMPLATE


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character spans that carry loss.

    As open-instruct's tulu v1 masking: each assistant message with its end-of-turn marker
    carries loss; everything else, including the assistant header, does not.
    """
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:i], tokenize=False, add_generation_prompt=True)) if i else 0
        end = len(render(messages[: i + 1], tokenize=False))
        spans.append((start, end))
    return text, spans


def tokenize_sft(tokenizer, row: dict, index: int, max_seq_length: int) -> Example:
    text, spans = assistant_char_spans(tokenizer, conversation(row))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(s <= a and b <= e and a < b for s, e in spans) else IGNORE
        for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    # Truncation after masking: an example whose answers lie past the limit keeps no label.
    ids = enc["input_ids"][:max_seq_length]
    return Example(index, example_id(row, index), ids, labels[:max_seq_length])


def _document_text(tokenizer, row: dict) -> str:
    if row.get("text") is not None:
        return row["text"]
    return tokenizer.apply_chat_template(conversation(row), tokenize=False)


def tokenize_pre(tokenizer, row: dict, index: int, max_seq_length: int) -> Example:
    text = _document_text(tokenizer, row)
    special = row.get("text") is not None
    ids = tokenizer(text, add_special_tokens=special)["input_ids"][:max_seq_length]
    return Example(index, example_id(row, index), ids, list(ids))


def mlm_generator(example_key: str, checkpoint: str) -> torch.Generator:
    """Masking depends only on (document, checkpoint), so train and test runs mask alike."""
    digest = hashlib.sha256(f"{example_key}\0{checkpoint}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def tokenize_mlm(tokenizer, row: dict, index: int, max_seq_length: int, checkpoint: str) -> Example:
    text = _document_text(tokenizer, row)
    ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_seq_length)[
        "input_ids"
    ]
    special = set(tokenizer.all_special_ids)
    candidates = [i for i, tok in enumerate(ids) if tok not in special]
    eid = example_id(row, index)
    draw = torch.rand(len(candidates), generator=mlm_generator(eid, checkpoint))
    masked = {candidates[i] for i in torch.nonzero(draw < MLM_PROBABILITY).flatten().tolist()}
    if candidates and not masked:  # every document contributes at least one prediction
        masked = {candidates[int(torch.argmin(draw))]}
    labels = [tok if i in masked else IGNORE for i, tok in enumerate(ids)]
    inputs = [tokenizer.mask_token_id if i in masked else tok for i, tok in enumerate(ids)]
    return Example(index, eid, inputs, labels)


def tokenize(
    tokenizer, row: dict, index: int, paradigm: str, max_seq_length: int, checkpoint: str = ""
) -> Example:
    if paradigm == "sft":
        return tokenize_sft(tokenizer, row, index, max_seq_length)
    if paradigm == "pre":
        return tokenize_pre(tokenizer, row, index, max_seq_length)
    return tokenize_mlm(tokenizer, row, index, max_seq_length, checkpoint)


def label_positions(example: Example, paradigm: str) -> int:
    """How many tokens carry loss (causal paradigms predict token t+1 at position t)."""
    if paradigm == "mlm":
        return example.label_tokens
    return sum(label != IGNORE for label in example.labels[1:])


def batches_by_tokens(examples: list[Example], batch_tokens: int) -> list[list[Example]]:
    """Longest first; a batch's padded size (count x longest) stays within the token budget."""
    ordered = sorted(examples, key=lambda e: (-e.length, e.index))
    batches: list[list[Example]] = []
    for ex in ordered:
        if batches and (len(batches[-1]) + 1) * batches[-1][0].length <= batch_tokens:
            batches[-1].append(ex)
        else:
            batches.append([ex])
    return batches
