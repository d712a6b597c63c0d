"""Write notebooks/main_results.ipynb and notebooks/datasets.ipynb (thin calls into gradproj).

Run from anywhere: `python notebooks/build_notebooks.py`. Edit the cells here, not the notebooks.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

FIND_ROOT = """\
import os
import sys
from pathlib import Path

# The repository root, whether the notebook runs from notebooks/ or from the root.
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "gradproj").is_dir())
if str(ROOT) not in sys.path:  # gradproj importable without installing the package
    sys.path.insert(0, str(ROOT))
"""

MAIN_RESULTS = [
    new_markdown_cell(
        "# Main results: how projection changes the ranking of train examples\n\n"
        "Thin over `gradproj.analysis` (definitions: docs/analysis.md). Set the score "
        "directories below; by default the demo's scores (`bash scripts/demo.sh`)."
    ),
    new_code_cell(
        FIND_ROOT + "\n"
        "# One score directory per projection; by default those of `bash scripts/demo.sh`.\n"
        "SCORES = Path(os.environ.get('GRADPROJ_SCORES', ROOT / 'demo_output' / 'scores'))\n"
        "REFERENCE = SCORES / 'full'\n"
        "CANDIDATES = sorted(p for p in SCORES.iterdir() if p.is_dir() and p != REFERENCE)\n"
        "OUTPUT = ROOT / 'demo_output' / 'notebook'\n"
        "OUTPUT = Path(os.environ.get('GRADPROJ_NOTEBOOK_OUTPUT', OUTPUT))\n"
        "EMULATE_ORIGINAL = False  # needs the full-gradient runs\n"
        "# Ground-truth retrieval: needs a test set naming each example's source (source_id).\n"
        "RETRIEVAL = True\n"
        "# Score directories of other targets (params, hidden), for the retrieval table only.\n"
        "RETRIEVAL_METHODS = sorted(SCORES.parent.glob('retrieval_scores/*/'))\n"
        "os.chdir(ROOT)  # the runs record their datasets relative to the repository root"
    ),
    new_code_cell(
        "from IPython.display import Image, Markdown, display\n\n"
        "from gradproj.analysis import CompareConfig, compare_projections\n\n"
        "comparison = compare_projections(CompareConfig(\n"
        "    REFERENCE, CANDIDATES, OUTPUT, emulate_original=EMULATE_ORIGINAL,\n"
        "    retrieval=RETRIEVAL, retrieval_methods=RETRIEVAL_METHODS))"
    ),
    new_markdown_cell("## Agreement with the reference (median and 95% bootstrap CI)"),
    new_code_cell(
        "summary = comparison.summary\n"
        "summary[summary.comparison == 'reference'].pivot_table(\n"
        "    index=['function', 'projection_type', 'dim'], columns='metric', values='median')"
    ),
    new_code_cell(
        "for path in comparison.figures:\n"
        "    if path.name.startswith(('violin_kendall', 'agreement_vs_dim')):\n"
        "        display(Image(filename=str(path)))"
    ),
    new_markdown_cell("## JL prediction vs measurement"),
    new_code_cell("comparison.theory_vs_measured"),
    new_markdown_cell("## Consecutive dims: permutation tests"),
    new_code_cell(
        "tests = comparison.permutation_tests\n"
        "tests[tests.metric == 'kendall_tau'] if len(tests) else tests"
    ),
    new_markdown_cell("## Dot vs cosine within one dimension"),
    new_code_cell(
        "for path in comparison.figures:\n"
        "    if path.name == 'dot_vs_cosine.png':\n"
        "        display(Image(filename=str(path)))"
    ),
    new_markdown_cell("## Score dispersion"),
    new_code_cell("comparison.dispersion"),
    new_markdown_cell(
        "## Which method finds each test example's source\n\n"
        "Share of test examples whose known source train example is ranked first (top1) or in "
        "the first five (top5), and the mean reciprocal rank of the source, with 95% bootstrap "
        "CIs (docs/retrieval.md)."
    ),
    new_code_cell(
        "from gradproj.analysis.report import retrieval_cells\n\n"
        "retrieval_cells(comparison.retrieval) if comparison.retrieval is not None else None"
    ),
    new_code_cell(
        "for path in comparison.figures:\n"
        "    if path.name == 'retrieval.png':\n"
        "        display(Image(filename=str(path)))"
    ),
    new_markdown_cell("## Ablation of the original pipeline (with `EMULATE_ORIGINAL`)"),
    new_code_cell("comparison.ablation"),
    new_markdown_cell("The full report with every table:"),
    new_code_cell("display(Markdown((OUTPUT / 'report.md').read_text()))"),
]

DATASETS = [
    new_markdown_cell(
        "# The train and test samples\n\n"
        "How they are drawn (random n with seed 42 from a train set; the first n from a test "
        "set), their length in tokens, and which examples extraction will truncate or find with "
        "an all-zero gradient at a given `max_seq_length`, found here before extraction."
    ),
    new_code_cell(
        FIND_ROOT + "\n"
        "TRAIN_SET = ROOT / 'examples' / 'data' / 'train.jsonl'\n"
        "TEST_SET = ROOT / 'examples' / 'data' / 'test.jsonl'\n"
        "N_TRAIN, N_TEST, SEED = 40, 10, 42\n"
        "MODEL = 'bundled:smollm2-135m-instruct'  # only its tokenizer is loaded\n"
        "MAX_SEQ_LENGTH = int(os.environ.get('GRADPROJ_MAX_SEQ_LENGTH', 256))\n"
        "PARADIGM = 'sft'"
    ),
    new_code_cell(
        "from gradproj.analysis.samples import first_n, length_histogram, length_table, "
        "random_sample\n"
        "from gradproj.data import load_split\n"
        "from gradproj.models import load_tokenizer, resolve_checkpoint\n\n"
        "train = random_sample(load_split(str(TRAIN_SET), 'train'), N_TRAIN, seed=SEED)\n"
        "test = first_n(load_split(str(TEST_SET), 'train'), N_TEST)\n"
        "tokenizer = load_tokenizer(resolve_checkpoint(MODEL, 0))\n"
        "len(train), len(test)"
    ),
    new_markdown_cell("## Length distribution in tokens"),
    new_code_cell(
        "tables = {name: length_table(tokenizer, ds, MAX_SEQ_LENGTH, PARADIGM)\n"
        "          for name, ds in [('train', train), ('test', test)]}\n"
        "length_histogram(tables, MAX_SEQ_LENGTH, None);"
    ),
    new_code_cell(
        "import pandas as pd\n\n"
        "pd.DataFrame({name: t.tokens.describe() for name, t in tables.items()})"
    ),
    new_markdown_cell(
        "## Examples truncated, or with no loss token left (all-zero gradient), at `MAX_SEQ_LENGTH`"
    ),
    new_code_cell(
        "pd.concat({name: t[t.truncated | t.zero_gradient] for name, t in tables.items()})"
    ),
]


def build(cells: list, name: str) -> Path:
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = HERE / name
    nbformat.write(notebook, path)
    return path


def main() -> None:
    for cells, name in [(MAIN_RESULTS, "main_results.ipynb"), (DATASETS, "datasets.ipynb")]:
        print(f"wrote {build(cells, name)}")


if __name__ == "__main__":
    main()
