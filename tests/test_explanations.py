"""explanations.html: its data are the score directories' top-k lists, and a real browser shows
them (headless Chromium: tests/browser.py)."""

import json
import re

from gradproj.analysis.explanations import PAGE, SHOWN, page_data, render
from gradproj.cli import compare_main
from tests.browser import chromium  # noqa: F401
from tests.conftest import STUDY_TOP_K, VARIANTS


def embedded(html: str) -> dict:
    payload = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    return json.loads(payload.group(1))


def topk_records(score_dir) -> dict:
    lines = (score_dir / "topk.jsonl").read_text().splitlines()
    return {r["test_id"]: r for r in map(json.loads, lines)}


def rows_of(path) -> dict:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def study_page(study) -> dict:
    return page_data([study["scores", v] for v in VARIANTS])


def test_page_data_are_the_score_directories_top_k(tiny_study):
    assert STUDY_TOP_K <= SHOWN  # so that every listed entry is on the page
    data = study_page(tiny_study)
    assert [m["label"] for m in data["methods"]] == ["embeddings full", "embeddings rademacher_16"]
    test_ids = [t["id"] for t in data["tests"]]
    assert test_ids == [r["id"] for r in tiny_study["test_rows"]]
    for variant, method in zip(VARIANTS, data["methods"], strict=True):
        records = topk_records(tiny_study["scores", variant])
        assert method["n_train"] == 9  # 11 rows, 2 skipped at extraction
        for test_id, lists in zip(test_ids, method["lists"], strict=True):
            assert lists == {f: records[test_id][f] for f in ("dot", "cosine")}
    train_rows = rows_of(tiny_study["train_file"])
    for train_id, turns in data["train"].items():
        expected = [[m["role"], m["content"]] for m in train_rows[train_id]["messages"]]
        assert turns == expected
    sources = {t["id"]: t["source"] for t in data["tests"]}
    assert sources == {r["id"]: r["source_id"] for r in tiny_study["test_rows"]}


def test_text_cannot_break_out_of_the_page():
    hostile = "</script><script>alert(1)</script><!-- \u2028 & é"
    data = {"methods": [], "tests": [{"id": hostile, "messages": [], "source": None}],
            "train": {}, "agreement": {"metrics": [], "rows": {}}}  # fmt: skip
    html = render(data)
    assert html.count("</script>") == 2  # the data element's and the script's own
    assert embedded(html) == data


def test_compare_writes_the_page_beside_the_report(tiny_study, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["--reference", str(tiny_study["scores", "full"]),
            "--candidates", str(tiny_study["scores", "rademacher_16"]),
            "--output", str(out), "--n_permutations", "10", "--n_bootstrap", "10"]  # fmt: skip
    assert compare_main(argv) == 0
    assert f"wrote {out / PAGE}" in capsys.readouterr().out
    data = embedded((out / PAGE).read_text())
    expected = study_page(tiny_study)
    assert data["methods"] == expected["methods"] and data["tests"] == expected["tests"]
    names = data["agreement"]["metrics"]
    assert "kendall_tau" in names
    rows = data["agreement"]["rows"]["q_1"]
    candidates = {(r[0], r[1]) for r in rows}
    assert ("rademacher_16", "cosine") in candidates and ("full", "dot_vs_cosine") in candidates


def test_choosing_a_test_example_shows_its_proponents_and_source(chromium, tiny_study, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    data = study_page(tiny_study)
    page = tmp_path / PAGE
    page.write_text(render(data))
    method = data["methods"][0]
    # a test example whose known source is among the listed proponents or opponents (cosine)
    i, test = next(
        (i, t) for i, t in enumerate(data["tests"])
        if i > 0 and t["source"] in method["lists"][i]["cosine"]["top_ids"]
        + method["lists"][i]["cosine"]["bottom_ids"]
    )  # fmt: skip
    chromium.get(page.as_uri())
    WebDriverWait(chromium, 20).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
    )
    search = chromium.find_element(By.ID, "search")
    search.send_keys(test["id"])
    items = chromium.find_elements(By.CSS_SELECTOR, "#tests li")
    assert [li.get_attribute("data-test") for li in items] == [test["id"]]
    items[0].click()
    assert chromium.find_element(By.ID, "test-id").text == f"Test example {test['id']}"
    column = chromium.find_elements(By.CSS_SELECTOR, ".column")[0]
    entries = column.find_elements(By.CSS_SELECTOR, ".entry")
    lists = method["lists"][i]["cosine"]
    assert [e.get_attribute("data-train") for e in entries] == lists["top_ids"] + lists[
        "bottom_ids"
    ]
    for entry in entries[:STUDY_TOP_K]:  # the proponents' texts, as the dataset has them
        turns = data["train"][entry.get_attribute("data-train")]
        summary = entry.find_element(By.TAG_NAME, "summary").text
        assert summary.startswith(turns[0][1][:20])
    marked = column.find_elements(By.CSS_SELECTOR, ".entry.source")
    assert [e.get_attribute("data-train") for e in marked] == [test["source"]]
    assert marked[0].find_element(By.CSS_SELECTOR, ".badge").text == "source"
    label = data["methods"][1]["label"]
    chromium.find_element(By.CSS_SELECTOR, f'input[data-method="{label}"]').click()  # untick
    columns = chromium.find_elements(By.CSS_SELECTOR, ".column")
    assert [c.get_attribute("data-method") for c in columns] == [method["label"]]
    chromium.find_element(By.CSS_SELECTOR, 'button[data-function="dot"]').click()
    column = chromium.find_elements(By.CSS_SELECTOR, ".column")[0]
    shown = [e.get_attribute("data-train") for e in column.find_elements(By.CSS_SELECTOR, ".entry")]
    assert shown == method["lists"][i]["dot"]["top_ids"] + method["lists"][i]["dot"]["bottom_ids"]


def test_the_page_opens_on_the_best_method_and_cuts_no_column_at_1280_px(
    chromium,  # noqa: F811
    tiny_study,
    tmp_path,
):
    """With LDS known, the best method's column comes first, on its best function; six
    columns at 1280 px wrap onto new rows rather than run off the right edge."""
    import pandas as pd
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    paths = [tiny_study["scores", v] for v in VARIANTS] * 3  # six columns
    labels = [m["label"] for m in study_page(tiny_study)["methods"]]
    lds = pd.DataFrame(
        {"method": [labels[0]] * 2 + [labels[1]] * 2, "function": ["dot", "cosine"] * 2,
         "lds": [0.1, 0.2, 0.3, 0.6]}
    )  # fmt: skip
    page = tmp_path / PAGE
    page.write_text(render(page_data(paths, lds=lds)))
    chromium.set_window_size(1280, 900)
    try:
        chromium.get(page.as_uri())
        WebDriverWait(chromium, 20).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
        )
        columns = chromium.find_elements(By.CSS_SELECTOR, ".column")
        assert len(columns) == 6
        assert columns[0].get_attribute("data-method") == labels[1]  # LDS 0.6, first
        on = chromium.find_element(By.CSS_SELECTOR, ".functions button.on")
        assert on.get_attribute("data-function") == "cosine"  # its best function
        assert "LDS 0.60 (cosine)" in columns[0].text
        width = chromium.execute_script("return document.documentElement.clientWidth")
        for column in columns:
            right = chromium.execute_script(
                "return arguments[0].getBoundingClientRect().right", column
            )
            assert right <= width, (right, width)
        assert chromium.execute_script(
            "const m = document.getElementById('main'); return m.scrollWidth <= m.clientWidth"
        )
    finally:
        chromium.set_window_size(1400, 900)
