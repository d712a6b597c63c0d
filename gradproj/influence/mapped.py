"""The original study's mapped JSON: per test example, every train example's fields with its
score, highest first (`--mapped`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from gradproj import scoredir, store
from gradproj.errors import UserError
from gradproj.influence.config import ScoreConfig
from gradproj.influence.kernel import Scores, ranked


def train_fragments(dataset: str, split: str, scores: Scores) -> list[str]:
    """Each kept train row's fields as a JSON object body, serialised once for every file."""
    from gradproj import data  # imports `datasets`, which only --mapped needs

    rows = data.load_split(dataset, data.split_name(split))  # indices are rows of the split
    if scores.train_index and max(scores.train_index) >= len(rows):
        raise UserError(
            f"dataset {dataset} split {split} has {len(rows)} rows, but the train run refers "
            f"to row {max(scores.train_index)}; pass the dataset the run was extracted from"
        )
    fragments = []
    for example_id, i in zip(scores.train_ids, scores.train_index, strict=True):
        row = rows[i]
        if data.example_id(row, i) != example_id:
            raise UserError(
                f"row {i} of {dataset} has id {data.example_id(row, i)!r}, but the train run "
                f"has {example_id!r} there; pass the dataset the run was extracted from"
            )
        fields = {k: v for k, v in row.items() if k != "score"}  # the score key wins
        fragments.append(json.dumps(fields, ensure_ascii=False, default=str)[1:-1])
    return fragments


def mapped_entries(row: torch.Tensor, fragments: list[str]) -> Iterator[tuple[float, str]]:
    """(score, train sample fields) of one test row, by score, highest first (ties in order)."""
    for i in ranked(row).tolist():
        yield row[i].item(), fragments[i]


def write_mapped_folder(out: Path, cfg: ScoreConfig, scores: Scores, train: store.Run) -> None:
    dataset = cfg.dataset or train.manifest.get("dataset")
    fragments = train_fragments(dataset, train.manifest.get("split", "train"), scores)
    several = len(scores.matrices) > 1
    for name, matrix in scores.matrices.items():
        for j, test_index in enumerate(scores.test_index):
            entries = mapped_entries(matrix[j], fragments)
            scoredir.write_mapped_file(out, name, test_index, entries, several)
