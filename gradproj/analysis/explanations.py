"""explanations.html: a static page to read each test example beside its proponents and opponents.

One self-contained file (styles, script and data inline; no server, no network), written by
`gradproj compare` beside its report. A reader picks a test example (a list, searchable by id and
text) and sees its conversation, its agreement figures, and for every score directory given, side
by side (wrapping onto new rows rather than off the page), the train examples it ranks highest
(proponents) and lowest (opponents), each with its rank, score and text; the test example's known
source (`source_id`, or each id of a list such as `related_ids`) is marked. Where `gradproj
compare --lds` measured them, the methods come best LDS first, each with its LDS, and the page
opens on the best one's score function.

It embeds only what the score directories' topk.jsonl lists (at most `SHOWN` per end and
function), never a score matrix, and each train text once, so it stays small and quick to open for
thousands of test examples (bench/explanations_page.py measures it).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pandas as pd

from gradproj import fsio
from gradproj.analysis.report import HEADLINE_METRICS
from gradproj.analysis.retrieval import SOURCE_FIELD, dataset_rows, method_label, source_ids
from gradproj.errors import UserError
from gradproj.scoredir import FUNCTIONS, ScoreDir, read_summary, read_topk

PAGE = "explanations.html"
SHOWN = 10  # proponents and opponents embedded per test example, function and directory
MESSAGE_CHARS = 3000  # a longer message is cut, and says so


def page_data(
    paths: list[Path],
    metrics: pd.DataFrame | None = None,
    source_field: str = SOURCE_FIELD,
    lds: pd.DataFrame | None = None,
) -> dict:
    """What the page shows, as JSON-ready data; `paths[0]` gives the test order and datasets.
    With an LDS table (lds.csv), the methods come best first and the page opens on the best
    one's score function."""
    loaded = [score_dir_lists(Path(p)) for p in paths]
    train_rows, test_rows = dataset_rows(loaded[0][0])
    test_ids = loaded[0][0].test_ids
    tests = []
    for test_id in test_ids:
        row = test_rows.get(test_id)
        if row is None:
            raise UserError(f"test example {test_id!r} of {paths[0]} is not in its test dataset")
        # one id, or several (a list such as related_ids) joined by ", "
        source = ", ".join(source_ids(row.get(source_field))) or None
        tests.append({"id": test_id, "messages": messages(row), "source": source})
    methods = [
        method | {"lists": [lists.get(t) for t in test_ids], "lds": lds_of(lds, method)}
        for _, method, lists in loaded
    ]
    methods.sort(key=best_lds, reverse=True)  # stable: without LDS, the order given
    shown = {i for _, _, lists in loaded for by_test in lists.values() for i in listed(by_test)}
    missing = sorted(shown - train_rows.keys())
    if missing:
        raise UserError(f"train example {missing[0]!r} of the scores is not in the train dataset")
    return {
        "methods": methods,
        "function": max(methods[0]["lds"], key=methods[0]["lds"].get, default=None),
        "tests": tests,
        "train": {i: messages(train_rows[i]) for i in sorted(shown)},
        "agreement": agreement_by_test(metrics, test_ids),
    }


def score_dir_lists(path: Path) -> tuple[ScoreDir, dict, dict]:
    """A score directory (its summary and test ids only), what the page says of it (label, path,
    train count, functions), and its topk.jsonl records by test id, cut to `SHOWN`."""
    summary = read_summary(path)
    records = read_topk(path)
    functions = [f for f in FUNCTIONS if f in summary.get("functions", FUNCTIONS)]
    test_ids = [r["test_id"] for r in records]
    score_dir = ScoreDir(path, {}, [], test_ids, summary)  # method_label reads the summary only
    method = {
        "label": method_label(score_dir),
        "path": str(path),
        "n_train": summary["counts"]["train"],
        "functions": functions,
    }
    lists = {r["test_id"]: {f: shown_lists(r[f]) for f in functions if f in r} for r in records}
    return score_dir, method, lists


def lds_of(lds: pd.DataFrame | None, method: dict) -> dict[str, float]:
    """{function: LDS} of the method's rows in lds.csv (none without a table)."""
    if lds is None:
        return {}
    rows = lds[(lds.method == method["label"]) & lds.function.isin(method["functions"])]
    return {r.function: round(float(r.lds), 4) for r in rows.itertuples() if pd.notna(r.lds)}


def best_lds(method: dict) -> float:
    return max(method["lds"].values(), default=float("-inf"))


def shown_lists(lists: dict) -> dict:
    return {key: values[:SHOWN] for key, values in lists.items()}


def listed(lists: dict) -> set[str]:
    return {i for by_function in lists.values() for key in ("top_ids", "bottom_ids")
            for i in by_function[key]}  # fmt: skip


def messages(row: dict) -> list[list[str]]:
    """[[role, content], ...]; a pretraining row's text is one "text" turn. Long ones are cut."""
    if row.get("messages"):
        from gradproj.data import conversation

        turns = [(m["role"], m["content"]) for m in conversation(row)]
    else:
        turns = [("text", str(row.get("text", "")))]
    return [[role, cut(content)] for role, content in turns]


def cut(text: str) -> str:
    if len(text) <= MESSAGE_CHARS:
        return text
    return text[:MESSAGE_CHARS] + f" [... {len(text) - MESSAGE_CHARS} more characters]"


def agreement_by_test(metrics: pd.DataFrame | None, test_ids: list[str]) -> dict:
    """Per test example: [candidate, function, value per headline metric] rows of metrics.csv."""
    if metrics is None or metrics.empty:
        return {"metrics": [], "rows": {}}
    names = [m for m in HEADLINE_METRICS if m in set(metrics.metric)]
    chosen = metrics[metrics.metric.isin(names)]
    table = chosen.pivot_table(
        index=["test_id", "candidate", "function"], columns="metric", values="value", sort=False
    )
    rows: dict[str, list] = {t: [] for t in test_ids}
    for (test_id, candidate, function), values in table.iterrows():
        cells = [None if pd.isna(values.get(m)) else round(float(values[m]), 4) for m in names]
        rows.setdefault(test_id, []).append([candidate, function, *cells])
    return {"metrics": names, "rows": rows}


def render(data: dict) -> str:
    """The page: the data as JSON in a script element (every '<' escaped, so no text in it can
    close the element), read by the inline script."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    payload = payload.replace("<", "\\u003c")
    return (
        page_asset("html")
        .replace("/*STYLE*/", page_asset("css"))
        .replace("/*SCRIPT*/", page_asset("js"))
        .replace("/*DATA*/", payload)  # last: no placeholder inside the data is replaced
    )


def page_asset(suffix: str) -> str:
    """The page's template, style sheet or script: package data in gradproj/analysis/page/, kept
    as files of their own so that editors and linters read them as HTML, CSS and JS."""
    path = resources.files("gradproj.analysis") / "page" / f"explanations.{suffix}"
    return path.read_text(encoding="utf-8")


def write_explanations(
    output: Path, paths: list[Path], metrics=None, source_field: str = SOURCE_FIELD, lds=None
) -> Path:
    """Write `output`/explanations.html (atomically) and return its path."""
    page = Path(output) / PAGE
    fsio.atomic_write_bytes(page, render(page_data(paths, metrics, source_field, lds)).encode())
    return page
