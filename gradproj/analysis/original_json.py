"""The original study's published outputs: its per-test JSON lists, written and read back.

`explain.py --mapped yes` wrote, per score function and test example,
`explainability/<dim>/<where>/<func>/<dataset>_test_<idx>.json`: a list of
`{"score": s, **train sample}` in dataset order, sorted with `list.sort(key=score,
reverse=True)`, `<dim>` being the vectors' length and `<dataset>` the train dataset's hub name
with `/` replaced by `_`. Its notebook loads every `*.json` of a folder in sorted name order,
drops the id `open_orca_t0.1598436` from each list and reads the position as the rank.

`agreement_per_list` recomputes a candidate folder's agreement with a reference folder both
ways: the notebook's and correctly (ranks from the scores, NaN-scored examples excluded by name).
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gradproj.analysis.metrics import kendall_tau_b, spearman_rho
from gradproj.analysis.original import ZERO_GRADIENT_ID
from gradproj.errors import UserError
from gradproj.options import option

WAYS = ("notebook", "correct")


@dataclass
class OriginalJsonConfig:
    """Options of `gradproj original` (`compare_projections.py --original_json`)."""

    original_json: list[Path] = option(
        help=(
            "folders of the original's JSON lists (explainability/<dim>/<where>/<func>), the "
            "reference first"
        ),
        nargs="+",
        metavar="DIR",
    )
    output: Path = option(help="directory for original_json.csv and original_json_summary.csv")
    nan_id: str = option(ZERO_GRADIENT_ID, "the id the notebook drops from every list")

    def __post_init__(self):
        self.original_json = [Path(p) for p in self.original_json]
        self.output = Path(self.output)
        if len(self.original_json) < 2:
            raise UserError("--original_json needs a reference folder and at least one candidate")


def original_list_dir(root: Path, dim: int, where: str, function: str) -> Path:
    """`explainability/<dim>/<where>/<func>` as explain.py named it."""
    return Path(root) / "explainability" / str(dim) / where / function


def write_original_lists(
    directory: Path, scores: np.ndarray, train_samples: list[dict], dataset: str
) -> list[Path]:
    """One JSON list per test row of `[n_test, n_train]` scores, exactly as explain.py wrote it."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for idx, row in enumerate(scores):
        structured = [{"score": float(row[i]), **sample} for i, sample in enumerate(train_samples)]
        structured.sort(key=lambda x: x["score"], reverse=True)
        path = directory / f"{dataset.replace('/', '_')}_test_{idx}.json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(structured, f, indent=2)
        paths.append(path)
    return paths


@dataclass
class OriginalList:
    """One test example's list: ids and scores in file order."""

    name: str
    ids: list[str]
    scores: np.ndarray


def read_original_lists(directory: Path) -> list[OriginalList]:
    """Every `*.json` list of a folder, in sorted file-name order (as the notebook loads them)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a folder of the original's JSON lists")
    paths = sorted(p for p in directory.iterdir() if p.name.endswith(".json"))
    if not paths:
        raise UserError(
            f"{directory} holds no .json files; give an explainability/.../<func> folder"
        )
    return [read_original_list(p) for p in paths]


def read_original_list(path: Path) -> OriginalList:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(items, list) or not all(
        isinstance(x, dict) and "score" in x and "id" in x for x in items
    ):
        raise UserError(
            f"{path}: expected a list of {{'score', 'id', ...}} items "
            "(explain.py's output with --mapped yes)"
        )
    ids = [str(x["id"]) for x in items]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: an id occurs twice in the list")
    scores = np.array([float(x["score"]) for x in items], dtype=np.float64)
    return OriginalList(path.name, ids, scores)


def notebook_ranks(lst: OriginalList, nan_id: str) -> dict[str, int]:
    """The notebook's rank: the position in the file once `nan_id` is filtered out."""
    return {i: r for r, i in enumerate(x for x in lst.ids if x != nan_id)}


def notebook_agreement(ref: OriginalList, cand: OriginalList, nan_id: str) -> dict[str, float]:
    """DAP_main_results.ipynb's compute_metric: positions of the reference's ids in both lists."""
    ranks_a, ranks_b = notebook_ranks(ref, nan_id), notebook_ranks(cand, nan_id)
    if ranks_a.keys() != ranks_b.keys():
        raise UserError(f"{ref.name}: the reference and candidate lists hold different ids")
    a = np.array([ranks_a[i] for i in ranks_a], dtype=np.float64)[None, :]
    b = np.array([ranks_b[i] for i in ranks_a], dtype=np.float64)[None, :]
    return {"kendall_tau": kendall_tau_b(a, b)[0], "spearman_rho": spearman_rho(a, b)[0]}


def correct_agreement(ref: OriginalList, cand: OriginalList) -> tuple[dict[str, float], list[str]]:
    """Agreement of the scores themselves, over the ids with a finite score in both lists;
    returns the excluded ids too."""
    cand_scores = dict(zip(cand.ids, cand.scores, strict=True))
    if set(cand_scores) != set(ref.ids):
        raise UserError(f"{ref.name}: the reference and candidate lists hold different ids")
    b_all = np.array([cand_scores[i] for i in ref.ids])
    keep = np.isfinite(ref.scores) & np.isfinite(b_all)
    excluded = [i for i, k in zip(ref.ids, keep, strict=True) if not k]
    a, b = ref.scores[keep][None, :], b_all[keep][None, :]
    return {"kendall_tau": kendall_tau_b(a, b)[0], "spearman_rho": spearman_rho(a, b)[0]}, excluded


def agreement_per_list(
    reference: Path, candidates: list[Path], nan_id: str = ZERO_GRADIENT_ID
) -> tuple[pd.DataFrame, dict[str, set[str]]]:
    """Per candidate, test list, way and metric: the value; and per candidate the ids excluded
    from the correct way for a non-finite score."""
    ref_lists = read_original_lists(reference)
    rows, excluded = [], {}
    for candidate in candidates:
        cand_lists = read_original_lists(candidate)
        if [x.name for x in cand_lists] != [x.name for x in ref_lists]:
            raise UserError(f"{candidate} and {reference} hold different file names")
        excluded[str(candidate)] = set()
        for ref, cand in zip(ref_lists, cand_lists, strict=True):
            correct, dropped = correct_agreement(ref, cand)
            excluded[str(candidate)].update(dropped)
            ways = {"notebook": notebook_agreement(ref, cand, nan_id), "correct": correct}
            for way, values in ways.items():
                for metric, value in values.items():
                    rows.append(
                        {
                            "candidate": str(candidate),
                            "test_file": ref.name,
                            "way": way,
                            "metric": metric,
                            "value": float(value),
                        }
                    )
    return pd.DataFrame(rows), excluded


def median_over_lists(per_test: pd.DataFrame) -> pd.DataFrame:
    """Median over test lists, the two ways side by side."""
    table = per_test.pivot_table(
        index=["candidate", "metric"], columns="way", values="value", aggfunc="median", sort=False
    ).reset_index()
    return table[["candidate", "metric", *WAYS]]


def compare_original_json(
    reference: Path, candidates: list[Path], output: Path, nan_id: str = ZERO_GRADIENT_ID
) -> pd.DataFrame:
    """The `--original_json` command: writes original_json.csv and original_json_summary.csv."""
    per_test, excluded = agreement_per_list(reference, candidates, nan_id)
    for candidate, ids in excluded.items():
        if ids:
            names = ", ".join(sorted(ids))
            print(
                f"warning: {candidate}: excluded from the correct agreement for a NaN or "
                f"infinite score: {names}",
                file=sys.stderr,
            )
    table = median_over_lists(per_test)
    output.mkdir(parents=True, exist_ok=True)
    per_test.to_csv(output / "original_json.csv", index=False)
    table.to_csv(output / "original_json_summary.csv", index=False)
    return table
