"""The ground-truth file of influence (docs/formats.md, "Ground truth"): its one writer and one
reader, apart from the trainer that computes it (`gradproj.retrain`) and the analysis that reads
it (`gradproj.analysis.lds`), so that neither depends on the other.

The file holds, per subset s of the train examples, its membership mask and every test
example's mean loss after fine-tuning on it, with the base model's losses; its metadata records
which examples (ids, and a hash of each tokenized example) the losses were computed on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from gradproj import data, fsio
from gradproj.errors import UserError

TRUTH_FORMAT = "gradproj-retrain/1"


@dataclass
class GroundTruth:
    """A ground-truth file read back: `masks[s, i]` is True when train example i was in subset
    s; `losses[s, j]` is test example j's mean loss after fine-tuning on subset s."""

    path: Path
    masks: np.ndarray  # bool [M, n_train]
    losses: np.ndarray  # float64 [M, n_test]
    base_losses: np.ndarray  # float64 [n_test]
    train_ids: list[str]
    test_ids: list[str]
    info: dict


def write_ground_truth(
    path: Path, masks: list[torch.Tensor], losses: list[torch.Tensor], base: torch.Tensor,
    info: dict,
) -> None:  # fmt: skip
    """The file from each subset's mask and test losses (in subset order) and the base losses;
    `info` is its metadata, less the format, which this module owns."""
    tensors = {"masks": torch.stack(masks), "losses": torch.stack(losses), "base_losses": base}
    fsio.write_safetensors(tensors, path, {"format": TRUTH_FORMAT, **info})


def load_ground_truth(path: str | Path) -> GroundTruth:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such ground-truth file (write one with gradproj retrain)")
    what = f"{path} is not a gradproj ground-truth file"
    try:
        with safe_open(str(path), "pt") as f:
            info = fsio.read_metadata(f)
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as err:  # truncated, or not safetensors at all
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise UserError(f"{what} ({first}); rerun gradproj retrain to write it") from None
    if info.get("format") != TRUTH_FORMAT:
        found = info.get("format", "none")
        raise UserError(f"{what}: its format is {found!r}, this gradproj reads {TRUTH_FORMAT}")
    try:
        masks, losses, base = tensors["masks"], tensors["losses"], tensors["base_losses"]
        train_ids, test_ids = (
            [str(x) for x in info["train_ids"]],
            [str(x) for x in info["test_ids"]],
        )
    except KeyError as err:
        raise UserError(f"{what}: it lacks {err.args[0]!r}") from None
    shapes_agree = (
        masks.ndim == 2
        and losses.shape == (masks.shape[0], len(test_ids))
        and masks.shape[1] == len(train_ids)
        and base.shape == (len(test_ids),)
    )
    if not shapes_agree:
        raise UserError(f"{what}: its tensors and id lists disagree in shape")
    return GroundTruth(
        path, masks.numpy().astype(bool), losses.double().numpy(), base.double().numpy(),
        train_ids, test_ids, info,
    )  # fmt: skip


# --- The examples a result is computed on ---


def skipped_record(skipped: dict) -> dict:
    """How the file records an example skipped for having no label token (the only rows that
    `gradproj retrain` skips; it refuses invalid ones): its row, id and reason, in the words
    of the files written before the extraction's record of skips was shared."""
    return {"index": skipped["index"], "id": skipped["id"], "reason": "no label token"}


def example_sha256(example: data.Example) -> str:
    """The hash of a tokenized example: its input ids and labels, all that training sees."""
    return hashlib.sha256(json.dumps([example.input_ids, example.labels]).encode()).hexdigest()


def examples_record(train: list[data.Example], test: list[data.Example]) -> dict:
    """The examples' ids and hashes, in order. The file records them, and so do the trainer's
    parts and prefix states: a file's path says nothing of what it held then."""
    record = {}
    for side, examples in (("train", train), ("test", test)):
        record[f"{side}_ids"] = [ex.id for ex in examples]
        record[f"{side}_sha256"] = [example_sha256(ex) for ex in examples]
    return record


def data_difference(recorded: dict, record: dict) -> str | None:
    """The first difference between recorded examples and those of `record`, in words, or None.
    A record without hashes (a finished file of an older gradproj) is compared by its ids."""
    for side in ("train", "test"):
        before, hashes = recorded.get(f"{side}_ids"), recorded.get(f"{side}_sha256", [])
        if before is None:
            return f"no {side} ids are recorded: an older gradproj wrote it"
        if not (is_text_list(before) and is_text_list(hashes) and len(hashes) in (0, len(before))):
            return f"its record of the {side} examples is not readable"
        now, current = record[f"{side}_ids"], record[f"{side}_sha256"]
        if before != now:
            return ids_difference(side, before, now)
        if hashes and hashes != current:
            k = next(k for k, (a, b) in enumerate(zip(hashes, current, strict=True)) if a != b)
            return f"{side} example {now[k]!r} changed (its tokens or labels)"
    return None


def is_text_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def ids_difference(side: str, before: list[str], now: list[str]) -> str:
    known, current = set(before), set(now)
    new = next((i for i in now if i not in known), None)
    if new is not None:
        return f"{side} example {new!r} is new"
    gone = next((i for i in before if i not in current), None)
    if gone is not None:
        return f"{side} example {gone!r} is gone"
    if len(before) != len(now):  # only where one list repeats an id (an older gradproj's)
        return f"{len(before)} {side} examples are recorded, the data has {len(now)}"
    k = next(k for k, (a, b) in enumerate(zip(before, now, strict=True)) if a != b)
    return (
        f"the {side} examples are in another order (position {k} holds {now[k]!r}, was "
        f"{before[k]!r})"
    )
