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
        "agreement": agreement(metrics, test_ids),
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


def agreement(metrics: pd.DataFrame | None, test_ids: list[str]) -> dict:
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
        TEMPLATE.replace("/*STYLE*/", STYLE)
        .replace("/*SCRIPT*/", SCRIPT)
        .replace("/*DATA*/", payload)
    )


def write_explanations(
    output: Path, paths: list[Path], metrics=None, source_field: str = SOURCE_FIELD, lds=None
) -> Path:
    """Write `output`/explanations.html (atomically) and return its path."""
    page = Path(output) / PAGE
    fsio.atomic_write_bytes(page, render(page_data(paths, metrics, source_field, lds)).encode())
    return page


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gradproj explanations</title>
<style>/*STYLE*/</style></head>
<body>
<aside id="side"><h1>Test examples</h1>
<input id="search" type="search" placeholder="search ids and text" autocomplete="off">
<div id="count"></div><ol id="tests"></ol></aside>
<main id="main"><p class="hint">Pick a test example on the left.</p></main>
<script type="application/json" id="data">/*DATA*/</script>
<script>/*SCRIPT*/</script>
</body></html>
"""

STYLE = """
* { box-sizing: border-box; }
body { margin: 0; display: flex; height: 100vh; font: 14px/1.4 system-ui, sans-serif;
  color: #1d2330; background: #f6f7f9; }
aside { width: 280px; flex: none; display: flex; flex-direction: column; border-right: 1px solid
  #d5d9e0; background: #fff; }
aside h1 { font-size: 15px; margin: 12px 12px 6px; }
#search { margin: 0 12px 4px; padding: 6px 8px; border: 1px solid #b9c0cc; border-radius: 4px; }
#count { margin: 0 12px 6px; color: #667; font-size: 12px; }
#tests { list-style: none; margin: 0; padding: 0; overflow-y: auto; flex: 1; }
#tests li { padding: 6px 12px; cursor: pointer; border-top: 1px solid #eef0f3; }
#tests li:hover { background: #eef3fb; }
#tests li.active { background: #dbe7fb; }
#tests li b { display: block; font-size: 13px; }
#tests li span { color: #556; font-size: 12px; display: block; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
main { flex: 1; overflow-y: auto; padding: 14px 20px; }
h2 { font-size: 17px; margin: 4px 0 8px; } h3 { font-size: 14px; margin: 14px 0 6px; }
.turn { margin: 4px 0; padding: 6px 10px; border-radius: 6px; white-space: pre-wrap;
  background: #fff; border: 1px solid #e1e4ea; }
.turn .role { font-size: 11px; text-transform: uppercase; color: #778; display: block; }
.turn.assistant { background: #f1f7ee; }
details.agreement { margin: 10px 0; } details.agreement summary { cursor: pointer;
  font-weight: 600; }
table.agreement { border-collapse: collapse; background: #fff; font-size: 12px; }
table.agreement td, table.agreement th { border: 1px solid #dde1e7; padding: 3px 8px;
  text-align: right; }
table.agreement td:nth-child(-n+2), table.agreement th:nth-child(-n+2) { text-align: left; }
.functions button { margin-right: 6px; padding: 3px 10px; border: 1px solid #99a3b5;
  background: #fff; border-radius: 4px; cursor: pointer; }
.functions button.on { background: #2f5fb3; color: #fff; border-color: #2f5fb3; }
.columns { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
.column { flex: 1 1 250px; min-width: 250px; max-width: 100%; }
.column .lds { font-size: 12px; color: #2f5fb3; font-weight: 600; }
.methods, .functions { margin: 6px 0; }
.methods label { margin-right: 12px; font-size: 12px; white-space: nowrap; }
.column h3 { margin-top: 8px; }
.column .path { color: #778; font-size: 11px; word-break: break-all; }
.entry { background: #fff; border: 1px solid #e1e4ea; border-radius: 6px; padding: 6px 8px;
  margin: 6px 0; }
.entry.source { border: 2px solid #d98b00; background: #fff8e8; }
.entry .head { font-size: 12px; color: #445; }
.entry .head b { color: #1d2330; }
.badge { display: inline-block; background: #d98b00; color: #fff; border-radius: 3px;
  padding: 0 5px; font-size: 11px; margin-left: 6px; }
.entry details summary { cursor: pointer; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; color: #334; }
.entry details[open] summary { white-space: normal; }
.kind { font-size: 12px; font-weight: 600; color: #556; margin: 10px 0 0; }
.hint { color: #667; }
"""

SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const testsEl = document.getElementById("tests"), mainEl = document.getElementById("main");
const searchEl = document.getElementById("search"), countEl = document.getElementById("count");
const functions = [...new Set(DATA.methods.flatMap(m => m.functions))];
let chosen = null;
let func = DATA.function || (functions.includes("cosine") ? "cosine" : functions[0]);
const hidden = new Set();  // score directories the reader has unticked

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}
const flat = t => t.map(m => m[1]).join(" ");
const haystack = DATA.tests.map(t => (t.id + " " + flat(t.messages)).toLowerCase());

function showList() {
  const q = searchEl.value.trim().toLowerCase();
  const items = [];
  DATA.tests.forEach((t, i) => {
    if (q && !haystack[i].includes(q)) return;
    const li = el("li", {"data-test": t.id}, el("b", {}, t.id),
                  el("span", {}, (t.messages[0] || ["", ""])[1].slice(0, 120)));
    if (i === chosen) li.className = "active";
    li.onclick = () => choose(i);
    items.push(li);
  });
  testsEl.replaceChildren(...items);
  countEl.textContent = items.length + " of " + DATA.tests.length;
}

function conversation(turns) {
  return turns.map(([role, text]) =>
    el("div", {class: "turn " + role}, el("span", {class: "role"}, role), text));
}

function agreementTable(testId) {
  const rows = (DATA.agreement.rows || {})[testId] || [];
  if (!rows.length) return [];
  const head = el("tr", {}, ...["candidate", "function", ...DATA.agreement.metrics]
    .map(h => el("th", {}, h)));
  const cell = v => el("td", {}, v === null ? "-" : String(v));
  const body = rows.map(r => el("tr", {}, ...r.map(cell)));
  const title = "Agreement with the reference for this test example (" + rows.length + " rows)";
  return [el("details", {class: "agreement"}, el("summary", {}, title),
             el("table", {class: "agreement"}, head, ...body))];
}

function entries(method, lists, kind, source) {
  const ids = lists[kind + "_ids"], scores = lists[kind + "_scores"];
  return ids.map((id, r) => {
    const rank = kind === "top" ? r + 1 : method.n_train - r;
    const isSource = source !== null && source.split(", ").includes(id);
    const turns = DATA.train[id];
    const head = el("div", {class: "head"}, el("b", {}, "#" + rank), " \u00b7 " + func + " " +
                    scores[r].toPrecision(5) + " \u00b7 ", el("b", {}, id));
    if (isSource) head.append(el("span", {class: "badge"}, "source"));
    const details = el("details", {}, el("summary", {}, flat(turns)), ...conversation(turns));
    return el("div", {class: "entry" + (isSource ? " source" : ""), "data-train": id,
                      "data-rank": rank}, head, details);
  });
}

function column(method, i) {
  const lists = method.lists[i];
  const col = el("div", {class: "column", "data-method": method.label},
                 el("h3", {}, method.label), el("div", {class: "path"}, method.path));
  const lds = Object.entries(method.lds || {})
    .map(([f, v]) => "LDS " + v.toFixed(2) + " (" + f + ")");
  if (lds.length) col.append(el("div", {class: "lds"}, lds.join(" \u00b7 ")));
  if (!lists || !lists[func]) {
    col.append(el("p", {class: "hint"}, "not scored with " + func));
    return col;
  }
  const source = DATA.tests[i].source;
  col.append(el("div", {class: "kind"}, "Proponents (highest " + func + ")"),
             ...entries(method, lists[func], "top", source),
             el("div", {class: "kind"}, "Opponents (lowest " + func + ")"),
             ...entries(method, lists[func], "bottom", source));
  return col;
}

function show() {
  const t = DATA.tests[chosen];
  const buttons = functions.map(f => {
    const b = el("button", {class: f === func ? "on" : "", "data-function": f}, f);
    b.onclick = () => { func = f; show(); };
    return b;
  });
  const toggles = DATA.methods.map((m, k) => {
    const box = el("input", {type: "checkbox", "data-method": m.label});
    box.checked = !hidden.has(k);
    box.onchange = () => { box.checked ? hidden.delete(k) : hidden.add(k); show(); };
    return el("label", {}, box, " " + m.label);
  });
  const shown = DATA.methods.filter((m, k) => !hidden.has(k));
  mainEl.replaceChildren(
    el("h2", {id: "test-id"}, "Test example " + t.id),
    ...(t.source ? [el("p", {}, "Known source: ", el("b", {}, t.source))] : []),
    ...conversation(t.messages),
    ...agreementTable(t.id),
    el("h3", {}, "Train examples by score"),
    el("div", {class: "methods"}, ...toggles),
    el("div", {class: "functions"}, ...buttons),
    el("div", {class: "columns"}, ...shown.map(m => column(m, chosen))));
}

function choose(i) {
  chosen = i;
  history.replaceState(null, "", "#" + encodeURIComponent(DATA.tests[i].id));
  for (const li of testsEl.children)
    li.classList.toggle("active", li.dataset.test === DATA.tests[i].id);
  show();
}

searchEl.oninput = showList;
showList();
const fromHash = DATA.tests.findIndex(t => "#" + encodeURIComponent(t.id) === location.hash);
if (DATA.tests.length) choose(fromHash >= 0 ? fromHash : 0);
document.body.dataset.ready = "1";
document.body.dataset.readyMs = performance.now().toFixed(0);  // for bench/explanations_page.py
"""
