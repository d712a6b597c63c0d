"""The original study's mapped JSON: per test example, every train example's fields with its
score, highest first (`--mapped`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from gradproj import scoredir, store
from gradproj.influence.config import ScoreConfig
from gradproj.influence.kernel import Scores, ranked


def train_fragments(train: store.Run, dataset: str | None, scores: Scores) -> list[str]:
    """Each kept train row's fields as a JSON object body, serialised once for every file."""
    rows = dict(zip(train.ids, train.dataset_rows(dataset), strict=True))
    fragments = []
    for example_id in scores.train_ids:  # the run's examples less those scoring dropped
        fields = {k: v for k, v in rows[example_id].items() if k != "score"}  # the score key wins
        fragments.append(json.dumps(fields, ensure_ascii=False, default=str)[1:-1])
    return fragments


def mapped_entries(row: torch.Tensor, fragments: list[str]) -> Iterator[tuple[float, str]]:
    """(score, train sample fields) of one test row, by score, highest first (ties in order)."""
    for i in ranked(row).tolist():
        yield row[i].item(), fragments[i]


def write_mapped_folder(out: Path, cfg: ScoreConfig, scores: Scores, train: store.Run) -> None:
    fragments = train_fragments(train, cfg.dataset, scores)
    several = len(scores.matrices) > 1
    for name, matrix in scores.matrices.items():
        for j, test_index in enumerate(scores.test_index):
            entries = mapped_entries(matrix[j], fragments)
            scoredir.write_mapped_file(out, name, test_index, entries, several)
