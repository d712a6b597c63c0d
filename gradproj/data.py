"""Datasets in, tokenized examples with loss labels out, batched under a token budget."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from gradproj.errors import UserError, check_unique_ids

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
_ROW_SLICE = re.compile(r"^[\w.-]+\[\s*(-?\d+)?\s*:\s*(-?\d+)?\s*\]$")
ROLES = ("system", "user", "assistant")
NO_ASSISTANT = "no assistant turn (sft computes the loss on assistant turns only)"
# Invalid rows named in an error before the rest are only counted.
MAX_NAMED = 20


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
    return load_rows(dataset, split)[0]


def load_rows(dataset: str, split: str) -> tuple[datasets.Dataset, int]:
    """The rows a split (or slice of it) chooses, and the split row of the first of them."""
    base = split_name(split)
    full = _load_base_split(dataset, base)
    try:
        (instr,) = datasets.ReadInstruction.from_spec(split).to_absolute({base: len(full)})
    except Exception as err:
        raise UserError(f"split slice {split!r} is not valid: {err}") from err
    bounds = _ROW_SLICE.match(split)
    for bound in bounds.groups() if bounds else ():
        if bound is not None and (int(bound) > len(full) or -int(bound) > len(full)):
            raise UserError(
                f"split slice {split!r} reaches past the end of split {base!r} of {dataset}, "
                f"which has {len(full)} rows (0..{len(full) - 1})"
            )
    return full.select(range(instr.from_, instr.to)), instr.from_


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
            problem = json_problem(path) if builder == "json" else None
            raise UserError(problem or f"cannot read {dataset}: {_first_line(err)}") from err
    return _load_hub_split(dataset, base)


def hub_advice() -> str:
    """What to do when the hub could not be asked: it depends on whether offline mode is set."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        return ", or unset HF_HUB_OFFLINE to download"
    return ", and that this machine can reach huggingface.co (or use a local copy)"


def looks_like_path(name: str) -> bool:
    """A name the user meant as a local path (a hub id is `name` or `owner/name`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _load_hub_split(dataset: str, base: str) -> datasets.Dataset:
    if looks_like_path(dataset):
        raise UserError(f"dataset {dataset!r}: no such file or directory")
    try:
        return datasets.load_dataset(dataset, split=base)
    except ValueError as err:
        if "split" in str(err).lower():
            raise UserError(f"split {base!r} does not exist in {dataset}") from err
        raise UserError(f"cannot load dataset {dataset}: {_first_line(err)}") from err
    except Exception as err:
        raise UserError(
            f"dataset {dataset!r} is neither a local path nor reachable on the hub "
            f"({_first_line(err)}); check the name{hub_advice()}"
        ) from err


def json_problem(path: Path) -> str | None:
    """Why a .json/.jsonl file cannot be loaded, naming the file and line; None if not found."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16).lstrip()
    if not head:
        return f"{path} is empty: it holds no rows; give a file with one JSON object per line"
    if head.startswith("["):  # one JSON array rather than JSON lines
        try:
            json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as err:
            return f"{path} line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})"
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path} line {number}: not valid JSON ({err.msg}, column {err.colno})"
            if not isinstance(value, dict):
                return f"{path} line {number}: {_kind(value)}, not a JSON object (one row per line)"
            if problem := surrogate_problem(value):
                return f"{path} line {number}: {problem}"
    return None


def surrogate_problem(value) -> str | None:
    """Why a parsed JSON value is not valid Unicode text, or None: a JSON escape such as
    \\ud800 (or a command-line argument that is not UTF-8) makes an unpaired surrogate, which
    no tokenizer or UTF-8 output can take."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        return (
            f"a string holds an unpaired surrogate ({err.object[err.start : err.end]!a}), "
            "which is not valid Unicode text"
        )
    return None


def _first_line(err: BaseException) -> str:
    """The first line of the innermost cause: wrappers such as datasets' "An error occurred
    while generating the dataset" say nothing of what went wrong."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
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


def conversation_text(row: dict) -> str:
    """Every turn's content (user and assistant), or a pretraining row's `text`."""
    if row.get("messages"):
        return "\n".join(m["content"] for m in conversation(row))
    return str(row.get("text", ""))


def _kind(value) -> str:
    kinds = {
        type(None): "null",
        str: "a string",
        list: "a list",
        dict: "an object",
        bool: "a boolean",
    }
    return kinds.get(type(value), "a number" if isinstance(value, int | float) else "a value")


def conversation_problem(messages, need_assistant: bool) -> str | None:
    """What is wrong with a conversation, or None: a non-empty list of {role, content} objects."""
    if messages is None:
        return "no 'messages'"
    if not isinstance(messages, list):
        return f"'messages' is {_kind(messages)}, not a list of messages"
    if messages and all(isinstance(m, list) for m in messages):  # UltraChat nests one level
        messages = [m for group in messages for m in group]
    if not messages:
        return "'messages' is empty"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] is {_kind(m)}, not an object with 'role' and 'content'"
        if m.get("role") is None:
            return f"messages[{i}] has no 'role'"
        if m["role"] not in ROLES:
            return f"messages[{i}] has role {m['role']!r}; use one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}] 'content' is {_kind(m.get('content'))}, not a string"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return NO_ASSISTANT
    return None


def row_problem(row: dict, paradigm: str) -> str | None:
    """Why a row cannot be an example of the paradigm, or None when it can."""
    if paradigm == "sft":
        return conversation_problem(row.get("messages"), need_assistant=True)
    text = row.get("text")
    if text is not None:
        return None if isinstance(text, str) else f"'text' is {_kind(text)}, not a string"
    if row.get("messages") is None:
        return "neither 'text' nor 'messages'"
    return conversation_problem(row["messages"], need_assistant=False)


def example_ids(rows: datasets.Dataset, first_row: int = 0) -> list[str]:
    """Every chosen row's example id (`example_id`), in order."""
    keys = [c for c in ("id", "prompt_id") if c in rows.column_names]
    if not keys:
        return [str(first_row + i) for i in range(len(rows))]
    ids = []
    for batch in rows.select_columns(keys).iter(batch_size=4096):
        for position, values in enumerate(zip(*batch.values(), strict=True), start=len(ids)):
            ids.append(example_id(dict(zip(keys, values, strict=True)), first_row + position))
    return ids


def invalid_rows(rows: datasets.Dataset, paradigm: str, first_row: int = 0) -> list[dict]:
    """Every row the paradigm cannot use: its split row, id and what is wrong."""
    needed = [c for c in ("id", "prompt_id", "text", "messages") if c in rows.column_names]
    found, position = [], 0
    for batch in rows.select_columns(needed).iter(batch_size=1024):
        columns = list(batch)
        for values in zip(*batch.values(), strict=True):
            row = dict(zip(columns, values, strict=True))
            problem = row_problem(row, paradigm)
            if problem:
                index = first_row + position
                found.append({"index": index, "id": example_id(row, index), "reason": problem})
            position += 1
    return found


def describe_invalid(found: list[dict], where: str, outcome: str) -> str:
    """Invalid rows: their count and `outcome`, then one line per row (the first MAX_NAMED)."""
    lines = [f"{len(found)} row(s) of {where} cannot be used; {outcome}"]
    lines += [f"  row {r['index']} (id {r['id']!r}): {r['reason']}" for r in found[:MAX_NAMED]]
    if len(found) > MAX_NAMED:
        lines.append(f"  ... and {len(found) - MAX_NAMED} more")
    return "\n".join(lines)


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


def checked_ids(rows: datasets.Dataset, first_row: int, where: str) -> list[str]:
    """Every chosen row's example id, after refusing repeated ids (`check_unique_ids`)."""
    ids = example_ids(rows, first_row)
    check_unique_ids(ids, where, first_row)
    return ids


def check_invalid_rows(
    rows: datasets.Dataset, first_row: int, where: str, paradigm: str, skip: bool | None
) -> None:
    """Every row must suit the paradigm, or with --skip_invalid_rows (`skip`; None: the command
    has no such option) is named and skipped."""
    invalid = invalid_rows(rows, paradigm, first_row)
    if not invalid:
        return
    if not skip:
        outcome = "fix them"
        if skip is False:
            outcome += ", or pass --skip_invalid_rows to record them as skipped and go on"
        raise UserError(describe_invalid(invalid, where, outcome))
    outcome = "skipped (--skip_invalid_rows), each recorded in the manifest with its reason"
    print("warning: " + describe_invalid(invalid, where, outcome), file=sys.stderr)


# the kept examples, and a record of each skipped row: {index, id, tokens, reason}
Tokenized = tuple[list[Example], list[dict]]


@dataclass(frozen=True)
class Tokenization:
    """How a split's rows become examples, with the rules for the rows that do not: one path
    for the extraction, `gradproj retrain` and kfac's factor pass, so that each sees the same
    tokens and skips the same rows."""

    tokenizer: object
    paradigm: str
    max_seq_length: int
    checkpoint: str = ""  # mlm's masking depends on it
    # None: the command has no --skip_invalid_rows, so an invalid row is refused without it
    skip_invalid_rows: bool | None = None

    def split(self, rows: datasets.Dataset, first_row: int, where: str) -> Tokenized:
        """Every row of a split, checked (columns, unique ids, rows the paradigm can use) and
        tokenized: the kept examples and the skipped rows' records."""
        check_columns(rows, self.paradigm)
        checked_ids(rows, first_row, where)
        check_invalid_rows(rows, first_row, where, self.paradigm, self.skip_invalid_rows)
        return self.examples(rows, first_row, 0, len(rows))

    def examples(self, rows: datasets.Dataset, first_row: int, start: int, end: int) -> Tokenized:
        """Rows start..end-1 as examples; a row without a label token (or, with
        --skip_invalid_rows, an invalid one) is skipped: {index, id, tokens, reason}."""
        kept, skipped = [], []
        for i in range(start, end):
            index, row = first_row + i, rows[i]
            ex, problem = self.example(row, index)
            if ex is None:
                eid = example_id(row, index)
                skipped.append({"index": index, "id": eid, "tokens": 0, "reason": problem})
            elif label_positions(ex, self.paradigm) == 0:
                reason = f"no label token within max_seq_length={self.max_seq_length}"
                skipped.append({"index": index, "id": ex.id, "tokens": ex.length, "reason": reason})
            else:
                kept.append(ex)
        return kept, skipped

    def example(self, row: dict, index: int) -> tuple[Example | None, str | None]:
        """The row's example, or (None, why) for a row --skip_invalid_rows lets through."""
        problem = row_problem(row, self.paradigm)
        if problem is None:
            try:
                return tokenize(
                    self.tokenizer, row, index, self.paradigm, self.max_seq_length,
                    self.checkpoint,
                ), None  # fmt: skip
            except Exception as err:  # text that the tokenizer or chat template cannot take
                problem = f"the tokenizer cannot take it ({type(err).__name__}: {err})"
        if not self.skip_invalid_rows:
            eid = example_id(row, index)
            advice = "" if self.skip_invalid_rows is None else " or --skip_invalid_rows"
            raise UserError(f"row {index} (id {eid!r}): {problem}; fix it{advice}")
        return None, f"invalid row: {problem}"


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
