"""The demo pipeline end to end on the real bundled model (cut down), and the notebooks on it."""

import os
import subprocess

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = os.environ | {
        "DEMO_OUTPUT": str(out),
        "DEMO_MAX_SEQ_LENGTH": "112",
        "DEMO_DIMS": "16,4096",
        "DEMO_TYPES": "rademacher",
        "DEMO_LIMIT": "20",
        "DEMO_RETRIEVAL": "params less hidden",
        "DEMO_LESS_DIM": "64",
        "DEMO_SKIP_SETUP": "1",
    }
    proc = subprocess.run(
        ["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_writes_report_with_plausible_agreement(demo_output):
    out, stdout = demo_output
    assert (out / "report" / "report.md").is_file()
    assert list((out / "report").glob("*.png"))
    summary = pd.read_csv(out / "report" / "summary.csv")
    tau = summary[(summary.comparison == "reference") & (summary.metric == "kendall_tau")]
    for function in ("dot", "cosine"):
        by_dim = tau[tau.function == function].set_index("dim")["median"]
        assert by_dim[4096] > by_dim[16], function
        assert 0.5 < by_dim[4096] <= 1.0
    assert "source_top1" in stdout and "report:" in stdout


def test_demo_ends_with_the_retrieval_table_of_every_method(demo_output):
    out, stdout = demo_output
    table = pd.read_csv(out / "report" / "retrieval.csv")
    methods = set(table.method)
    assert {"embeddings full", "embeddings rademacher_16", "bm25", "random"} <= methods
    assert {"hidden state (mean)", "hidden state (mean) · gram"} <= methods
    assert any(m.startswith("params kronecker_16x16") and m.endswith(" · gram") for m in methods)
    assert any(m.startswith("params kronecker_16x16") and "·" not in m for m in methods)
    assert any(m.startswith("params rademacher_64, 4 modules") for m in methods)
    assert (table.n_test == table.n_test.iloc[0]).all() and table.n_test.iloc[0] > 0
    assert "Every method" in stdout and stdout.splitlines()[-4].lstrip().startswith("random")


def test_demo_compares_the_far_test_set_by_its_related_ids(demo_output):
    out, stdout = demo_output
    table = pd.read_csv(out / "report_far" / "retrieval.csv")
    assert {"embeddings full", "bm25", "random", "hidden state (mean) · gram"} <= set(table.method)
    assert (table.n_test == table.n_test.iloc[0]).all() and table.n_test.iloc[0] > 0
    assert f"{out}/report_far" in stdout


def test_demo_skips_the_truncated_long_examples(demo_output):
    from gradproj.store import Run

    out, _ = demo_output
    run = Run(out / "gradients" / "full" / "smollm2-135m-instruct" / "train" / "train" / "0")
    assert "train_long_1" in {s["id"] for s in run.skipped}


@pytest.mark.parametrize("name", ["main_results.ipynb", "datasets.ipynb"])
def test_notebook_executes(demo_output, name, tmp_path, monkeypatch):
    out, _ = demo_output
    monkeypatch.setenv("GRADPROJ_SCORES", str(out / "scores"))
    monkeypatch.setenv("GRADPROJ_NOTEBOOK_OUTPUT", str(tmp_path / "notebook"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    client = NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(REPO)}})
    client.execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def test_demo_writes_the_explanation_browser_and_prints_its_path(demo_output):
    out, stdout = demo_output
    page = out / "report" / "explanations.html"
    assert f"explanation browser (a static page; open it in a web browser): {page}" in stdout
    html = page.read_text()
    assert "test_00" in html and '"source":"train_000"' in html


@pytest.mark.parametrize("variant", ["full", "rademacher_16"])
def test_query_of_a_bundled_test_example_is_extract_and_score_bit_for_bit(
    demo_output, variant, tmp_path
):
    """One test example of the bundled data, explained by `gradproj query` against the demo's
    train run, and extracted alone by `gradproj extract` with the demo's options and scored."""
    import json

    from gradproj.cli import extract_main, score_main
    from gradproj.query import QueryConfig, run_query

    out, _ = demo_output
    example = (REPO / "examples" / "data" / "test.jsonl").read_text().splitlines()[0]
    dataset = tmp_path / "one.jsonl"
    dataset.write_text(example + "\n")
    train = out / "gradients" / variant / "smollm2-135m-instruct" / "train" / "train" / "0"
    argv = ["bundled:smollm2-135m-instruct", str(dataset), "0", "--max_seq_length", "112",
            "--gradients_output_path", str(tmp_path / "g"), "--device", "cpu",
            "--random_projection", "--proj_dim", "full,16"]  # fmt: skip
    assert extract_main(argv) == 0
    test = tmp_path / "g" / variant / "smollm2-135m-instruct" / "one" / "train" / "0"
    argv = ["--train", str(train), "--test", str(test), "--output", str(tmp_path / "s"),
            "--top_k", "5"]  # fmt: skip
    assert score_main(argv) == 0
    expected = json.loads((tmp_path / "s" / "topk.jsonl").read_text())
    query = QueryConfig(train=str(train), messages=str(dataset), top_k=5, precondition="none")
    (result,) = run_query(query)
    assert result["query_id"] == expected["test_id"] == "test_00"
    for name in ("dot", "cosine"):
        pros, cons = result[name]["proponents"], result[name]["opponents"]
        assert [e["id"] for e in pros] == expected[name]["top_ids"]
        assert [e[name] for e in pros] == expected[name]["top_scores"]
        assert [e["id"] for e in cons] == expected[name]["bottom_ids"]
        assert [e[name] for e in cons] == expected[name]["bottom_scores"]
