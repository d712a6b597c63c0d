"""`gradproj query`: which train examples explain a new answer, against a built train run.

A front end that composes the two stages that already exist, so that a query's scores are those
`gradproj extract` + `gradproj score` would give it, bit for bit: the queries are extracted by
`gradproj.extract.run_extraction` with the train run's own options (read from its manifest; only
the dataset, the device and the output folder change), into a temporary run directory, and
scored against the train run by `gradproj.influence.compute_scores`, as `gradproj score` does.
The model is loaded once for every query of a file. The options shared with `gradproj score`
are declared and checked by `gradproj.influence.config`; `score_config` passes them on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gradproj import curvature, data, influence, models, scoredir, store
from gradproj.errors import UserError
from gradproj.extract.factors import ensure_kfac_factors
from gradproj.options import device_option, option, require

FORMATS = ("table", "json")
QUERY_SPLIT = "train"  # the split name of the temporary query dataset
TABLE_TEXT_CHARS = 70  # the start of a train example's text, in the table
# Options of the train run's extraction that describe its dataset or its share of it: the query
# run replaces them; every other option (model, checkpoint, target, projection, max_seq_length,
# dtype, batch size, ...) is the train run's.
DATASET_OPTIONS = ("dataset", "dataset_split", "limit", "start", "end")


@dataclass
class QueryConfig(influence.ScoringOptions):
    train: str = option(help="train run directory (gradproj extract) to explain against")
    messages: str | None = option(
        None,
        "the answers to explain: JSON lines in the train dataset's format, one conversation "
        "each (- reads stdin)",
        metavar="FILE",
    )
    prompt: str | None = option(
        None, "the user's message of the one answer to explain", metavar="TEXT"
    )
    response: str | None = option(None, "the assistant's answer to explain", metavar="TEXT")
    top_k: int = option(10, "proponents (highest scores) and opponents (lowest) to list")
    func: Literal[influence.FUNC_CHOICES] = option("both", "rank by which score function(s)")
    format: Literal[FORMATS] = option("table", "table (text starts) or json (texts in full)")
    dataset: str | None = option(
        None, "the train run's dataset, for the texts (default: its manifest's)"
    )
    device: str | None = device_option()
    memory_gb: float | None = option(
        None, "scoring memory budget in GiB (default: as gradproj score)"
    )
    # None: run_query picks gram where the train run supports it, else none
    precondition: Literal[influence.PRECONDITIONERS] | None = option(
        None,
        "curvature correction, as gradproj score's --precondition (default: gram where the "
        "train run's vectors are projected, the ranking that explains best; none otherwise)",
    )
    damping: float = influence.damping_option()
    curvature: str | None = influence.curvature_option()

    def __post_init__(self):
        pair = (self.prompt is not None, self.response is not None)
        require(
            [
                (
                    (self.messages is not None) != any(pair),
                    "give the answer to explain as --messages FILE (or -) or as --prompt and "
                    "--response, not both",
                ),
                (all(pair) or not any(pair), "--prompt and --response go together; give both"),
            ]
        )
        self.check_scoring_options()


# --- The queries ---


def read_queries(cfg: QueryConfig, paradigm: str) -> list[dict]:
    """The rows to explain, each with an id (`query_<n>` where the row names none)."""
    if cfg.messages is None:
        rows = [{"messages": [{"role": "user", "content": cfg.prompt},
                              {"role": "assistant", "content": cfg.response}]}]  # fmt: skip
        where = "--prompt/--response"
    else:
        where = "stdin" if cfg.messages == "-" else cfg.messages
        rows = parse_jsonl(read_text(cfg.messages), where)
    for n, row in enumerate(rows):
        if problem := data.surrogate_problem(row):
            raise UserError(f"{where} query {n + 1}: {problem}")
        problem = data.row_problem(row, paradigm)
        if problem:
            raise UserError(f"{where} query {n + 1}: {problem}; give rows like the train dataset's")
        if data.example_id(row, n) == str(n):
            row["id"] = f"query_{n}"
    ids = [data.example_id(row, n) for n, row in enumerate(rows)]
    if len(set(ids)) < len(ids):
        raise UserError(f"{where}: two queries share an id; give each its own 'id'")
    return rows


def read_text(source: str) -> str:
    """The file (stdin for -) as UTF-8 text, whatever the locale, or a one-line error."""
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as err:
        raise UserError(f"--messages {source}: cannot read it ({err.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"--messages {source}: not UTF-8 text (byte {raw[err.start]:#04x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from None


def parse_jsonl(text: str, where: str) -> list[dict]:
    rows = []
    # JSON lines end at "\n" only: splitlines() would also split inside strings that hold
    # U+2028, U+0085 and the like, which JSON allows raw
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where} line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where} line {number}: not a JSON object (one row per line)")
        rows.append(row)
    if not rows:
        raise UserError(f"{where} holds no query; give one JSON object per line")
    return rows


# --- The train side: its run, its extraction options, its texts ---


def train_options(train: store.Run) -> dict:
    """The train run's extraction options, which the queries are extracted with."""
    if train.manifest.mode == "store_mean":
        raise UserError(
            f"{train.path} holds the mean gradient of its dataset (--mode store_mean), not one "
            "per train example; give a run extracted with --mode store"
        )
    return train.extraction_options(
        "gradproj query", "re-extract the train run with this version of gradproj"
    )


def train_texts(train: store.Run, dataset: str | None) -> dict[str, str]:
    """{train id: conversation text} of every example the run holds, from its dataset."""
    rows = train.dataset_rows(dataset)
    return {i: data.conversation_text(row) for i, row in zip(train.ids, rows, strict=True)}


# --- Extraction and scoring of the queries ---


def extract_queries(rows: list[dict], train: store.Run, folder: Path, device: str) -> store.Run:
    """The queries' run, extracted with the train run's options into `folder`."""
    from gradproj.extract import ExtractConfig, run_extraction
    from gradproj.extract.layout import run_dir

    options = train_options(train)
    dataset = folder / "queries.jsonl"
    dataset.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    overrides = dict.fromkeys(DATASET_OPTIONS) | {
        "dataset": str(dataset),
        "dataset_split": QUERY_SPLIT,
        "gradients_output_path": str(folder / "gradients"),
        "skip_if_gradient_folder_exists": False,
        "skip_invalid_rows": False,
        "device": device,
        # "auto" means fp32 on CPU and bf16 on CUDA: keep what the train run computed in
        "dtype": dtype_name(options.get("dtype", "auto"), options.get("device", "cpu")),
    }
    known = {f.name for f in dataclasses.fields(ExtractConfig)}
    if not options.keys() <= known:
        raise UserError(
            f"{train.path}: extracted with options this version does not know "
            f"({', '.join(sorted(options.keys() - known))}); re-extract the train run"
        )
    cfg = ExtractConfig(**(options | overrides))
    target, spec = train_output(cfg, train)
    cfg.outputs = {target: [spec]}  # the one output the train run is, of the same pass
    with contextlib.redirect_stdout(sys.stderr):  # progress and summary lines are not results
        run_extraction(cfg)
    return store.Run(run_dir(cfg, target, spec))


def dtype_name(dtype: str, device: str) -> str:
    resolved = models.resolve_dtype(dtype, device)
    return next(name for name, value in models.DTYPES.items() if value == resolved)


def train_output(cfg, train: store.Run):
    """(target, output spec) of `cfg`'s pass that wrote the train run."""
    target, projection = train.manifest.target, train.manifest.projection
    name = f"{projection['type']}_{projection['dim']}" if projection else "full"
    for spec in cfg.outputs.get(target, []):
        if spec.name == name:
            return target, spec
    raise UserError(
        f"{train.path}: its manifest's options do not produce its own output ({target} {name}); "
        "re-extract the train run"
    )


def check_explainable(queries: store.Run) -> None:
    """Every query must have a gradient: one with no loss token left is not explained."""
    if queries.skipped:
        first = queries.skipped[0]
        raise UserError(
            f"query {first['id']!r} cannot be explained: {first['reason']} (the train run's "
            "setting); shorten the prompt or the answer"
        )


def score_config(cfg: QueryConfig, train: store.Run, queries: store.Run):
    return influence.ScoreConfig(
        train=str(train.path), test=str(queries.path), func=cfg.func, top_k=cfg.top_k,
        device=cfg.device, memory_gb=cfg.memory_gb, precondition=cfg.precondition,
        damping=cfg.damping, curvature=cfg.curvature,
    )  # fmt: skip


# --- Results ---


def explanations(cfg: QueryConfig, rows: list[dict], scores: influence.Scores, texts) -> list:
    """Per query: its id and conversation, and per function its top-k proponents and bottom-k
    opponents, each with its rank (1 = highest score), both scores, id and text."""
    positions = influence.topk_positions(scores, cfg.top_k)
    by_id = {data.example_id(row, n): row for n, row in enumerate(rows)}
    n_train = len(scores.train_ids)
    results = []
    for j, query_id in enumerate(scores.test_ids):
        row = by_id[query_id]
        result = {"query_id": query_id, "text": data.conversation_text(row)}
        if row.get("messages"):
            result["messages"] = data.conversation(row)
        for name in scores.matrices:
            top, bottom = positions[name][0][j], positions[name][1][j]
            result[name] = {
                "proponents": [entry(scores, texts, j, i, r + 1) for r, i in enumerate(top)],
                "opponents": [
                    entry(scores, texts, j, i, n_train - r) for r, i in enumerate(bottom)
                ],
            }
        results.append(result)
    return results


def entry(scores: influence.Scores, texts: dict, row: int, column: int, rank: int) -> dict:
    train_id = scores.train_ids[column]
    values = {name: m[row, column].item() for name, m in scores.matrices.items()}
    return {"rank": rank, "id": train_id} | values | {"text": texts[train_id]}


def format_table(results: list[dict], functions: tuple[str, ...]) -> str:
    lines = []
    for result in results:
        asked = one_line(result["text"], 2 * TABLE_TEXT_CHARS)
        lines.append(f"query {printable(result['query_id'])}: {asked}")
        lines.append(f"  scored by {result['method']}{PLAIN_HINT[result['precondition']]}")
        for name in functions:
            for kind in ("proponents", "opponents"):
                lines.append(f"  {kind} by {name}:")
                lines.append(f"  {'rank':>6} {'dot':>12} {'cosine':>9}  {'id':<14} text")
                for e in result[name][kind]:
                    lines.append(
                        f"  {e['rank']:>6} {score_text(e, 'dot'):>12} "
                        f"{score_text(e, 'cosine'):>9}  {printable(e['id']):<14} "
                        f"{one_line(e['text'], TABLE_TEXT_CHARS)}"
                    )
        lines.append("")
    return "\n".join(lines)


PLAIN_HINT = {"none": " (plain scores)", "gram": " (--precondition none for plain scores)",
              "kfac": " (--precondition none for plain scores)"}  # fmt: skip


def score_text(e: dict, name: str) -> str:
    if name not in e:
        return "-"
    return f"{e[name]:.4f}" if name == "cosine" else f"{e[name]:.4g}"


def one_line(text: str, width: int) -> str:
    flat = printable(" ".join(text.split()))
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def default_precondition(train: store.Run) -> str:
    """gram where the train run's vectors can be whitened (projected ones), else none: the
    ranking that explains best where it can be had (docs/choosing.md)."""
    try:
        curvature.check_supported(train)
    except UserError:
        return "none"
    return "gram"


def printable(text: str) -> str:
    """`text` with every character that is not printable escaped (ESC as `\\x1b`, U+202E as
    `\\u202e`): the table goes to a terminal, which such characters would drive."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def run_query(cfg: QueryConfig) -> list[dict]:
    """Explain each query against the train run; validate everything before the model loads."""
    train = influence.open_run(cfg.train, "train")
    cfg.precondition = cfg.precondition or default_precondition(train)
    options = train_options(train)
    rows = read_queries(cfg, options.get("paradigm", "sft"))
    texts = train_texts(train, cfg.dataset)
    if cfg.precondition == "kfac":  # its factors come from the model, which scoring does not read
        ensure_kfac_factors(train, cfg.curvature, cfg.device)
    with tempfile.TemporaryDirectory(prefix="gradproj-query-") as folder:
        queries = extract_queries(rows, train, Path(folder), cfg.device)
        check_explainable(queries)
        scores = influence.compute_scores(score_config(cfg, train, queries), train, queries).scores
        influence.warn_excluded({"train": scores.excluded["train"]})
    modules = len(train.manifest.modules) or None
    # what the scores are, as the analysis labels them (`params kronecker_16x16 · gram`)
    label = scoredir.scoring_label(train.manifest.as_dict(), modules, cfg.precondition, cfg.damping)
    method = {"method": label, "precondition": cfg.precondition}
    method["damping"] = cfg.damping if cfg.precondition != "none" else None
    return [method | result for result in explanations(cfg, rows, scores, texts)]


def print_results(cfg: QueryConfig, results: list[dict]) -> None:
    if cfg.format == "json":
        print(json.dumps(results, ensure_ascii=False, indent=1))
    else:
        print(format_table(results, cfg.functions), end="")
