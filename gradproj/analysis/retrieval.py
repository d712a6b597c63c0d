"""Source retrieval: does a method rank each test example's known source train example first?

For test sets whose examples come from a known train example (a paraphrase of it, as in the
bundled example data, named by a `source_id` field), every method's ranking of the train examples
is judged against that ground truth: the top-1 and top-5 hit rate and the mean reciprocal rank
of the source, each with a percentile bootstrap 95% CI over test examples. The field may instead
hold a list of ids (the far test set's `related_ids`: the train examples that teach the same
skill, fact or answer format); then the best-ranked of them counts, so a test example is found at
rank 1 when any of its related ids is ranked first. The methods: every
score directory given (any target, projection and score function), BM25 over the conversations'
text (the `bm25s` library) and a seeded random ranking.
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from gradproj.analysis.scores import align_to
from gradproj.analysis.stats import bootstrap_ci
from gradproj.errors import UserError
from gradproj.scoredir import FUNCTIONS, ScoreDir, scoring_label
from gradproj.store import Manifest, Run, manifest_problem

KS = (1, 5)
SOURCE_FIELD = "source_id"
STATISTICS = (*(f"top{k}" for k in KS), "mrr")


def read_rows(dataset: str, split: str) -> dict[str, dict]:
    """A dataset split's rows by example id (the ids extraction gives them)."""
    from gradproj import data  # imports `datasets`: only the retrieval evaluation needs it

    rows = data.load_split(dataset, split)
    return {data.example_id(row, i): row for i, row in enumerate(rows)}


def source_ids(value) -> list[str]:
    """The train ids a test row's source field names: one id (a string or a number), or a list
    of them (a JSON list, e.g. `related_ids`), in their order, repeats dropped; [] for none."""
    if value is None:
        return []
    values = value if isinstance(value, list | tuple) else [value]
    return list(dict.fromkeys(str(v) for v in values if v is not None and str(v) != ""))


def find_sources(
    test_rows: dict[str, dict], train_rows: dict[str, dict], scored: ScoreDir, field: str
) -> dict[str, list[str]]:
    """{test id: its source train ids} for the scored test examples, in the scores' order.

    A field holds one id or a list of ids. A test example without a source is left out with a
    warning naming it; so is a source skipped at extraction (a test example keeps its other
    sources, and is left out when none is left); a source that names no train example at all is
    an error.
    """
    scored_train = set(scored.train_ids)
    sources = {}
    for test_id in scored.test_ids:
        if test_id not in test_rows:
            raise UserError(
                f"test example {test_id!r} of the scores is not in the test dataset; "
                "the scores were computed on another dataset"
            )
        found = source_ids(test_rows[test_id].get(field))
        if not found:
            warn(f"test example {test_id!r} has no {field!r}: left out of the retrieval evaluation")
            continue
        kept = []
        for source in found:
            if source not in train_rows:
                raise UserError(
                    f"test example {test_id!r} has {field} {source!r}, which names no train "
                    f"example; correct the test set or choose another --source_field"
                )
            if source not in scored_train:
                left = "" if len(found) > 1 else ": left out of the retrieval evaluation"
                warn(
                    f"the source {source!r} of test example {test_id!r} has no scores (skipped "
                    f"at extraction){left}"
                )
                continue
            kept.append(source)
        if kept:
            sources[test_id] = kept
        elif len(found) > 1:
            warn(f"no source of test example {test_id!r} has scores: left out")
    if not sources:
        raise UserError(
            f"no scored test example has a {field!r} among the scored train examples: nothing "
            "to evaluate; pass a test set with sources or another --source_field"
        )
    return sources


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def source_ranks(
    score_dir: ScoreDir, function: str, source_of: dict[str, str | list[str]]
) -> np.ndarray:
    """1-based rank of each test example's source among the train examples, by score; with
    several sources, the rank of the best-ranked one.

    Ties are broken as score_influence.py's ranked lists break them (a stable sort: tied train
    examples keep their train order), so the rank is the source's place in those lists. One
    rank per entry of `source_of`, in its order.
    """
    return ranks_of_sources(
        score_dir.scores[function], score_dir.train_ids, score_dir.test_ids, source_of
    )


def ranks_of_sources(
    scores: np.ndarray,
    train_ids: list[str],
    test_ids: list[str],
    source_of: dict[str, str | list[str]],
) -> np.ndarray:
    column = {train_id: j for j, train_id in enumerate(train_ids)}
    row = {test_id: i for i, test_id in enumerate(test_ids)}
    ranks = []
    for test_id, sources in source_of.items():
        i = row[test_id]
        best = None
        for source in [sources] if isinstance(sources, str) else sources:
            j = column[source]
            ahead = np.sum(scores[i] > scores[i, j]) + np.sum(scores[i, :j] == scores[i, j])
            best = int(ahead) + 1 if best is None else min(best, int(ahead) + 1)
        ranks.append(best)
    return np.asarray(ranks, dtype=int)


def retrieval_statistics(ranks: np.ndarray, n_bootstrap: int = 2000, seed: int = 0) -> dict:
    """Top-k hit rates and MRR of the source ranks, each with its 95% bootstrap CI."""
    ranks = np.asarray(ranks)
    per_test = {f"top{k}": (ranks <= k).astype(float) for k in KS} | {"mrr": 1.0 / ranks}
    row: dict = {"n_test": int(ranks.size)}
    for name, values in per_test.items():
        low, high = bootstrap_ci(values, np.mean, n_bootstrap, seed=seed)
        row |= {name: float(np.mean(values)), f"{name}_ci_low": low, f"{name}_ci_high": high}
    return row


def bm25_scores(train_texts: list[str], test_texts: list[str]) -> np.ndarray:
    """`[n_test, n_train]` BM25 (Lucene variant, k1 1.5, b 0.75) of each test text as the query
    against the train texts as the corpus; lower-cased words, English stopwords, no stemming."""
    import bm25s

    def words(texts):
        return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)

    index = bm25s.BM25()
    index.index(words(train_texts), show_progress=False)
    vocabulary = set(index.vocab_dict)
    return np.stack(
        [index.get_scores([w for w in query if w in vocabulary]) for query in words(test_texts)]
    ).astype(np.float64)


def random_scores(n_test: int, n_train: int, seed: int) -> np.ndarray:
    """A seeded random ranking (expected top-1 hit rate 1/n_train)."""
    return np.random.default_rng(seed).random((n_test, n_train))


def method_label(score_dir: ScoreDir) -> str:
    """`<target> <full | type_dim>`, with the number of linear modules of a params run, then its
    preconditioning (` · gram`)."""
    manifest = train_run_manifest(score_dir)
    layers = (len(manifest.modules) if manifest else 0) or None
    return scoring_label(score_dir.manifest, layers, score_dir.precondition, score_dir.damping)


def train_run_manifest(score_dir: ScoreDir) -> Manifest | None:
    """The scored train run's whole manifest (the summary keeps a part), or None when the run
    is no longer where it was scored."""
    path = Path(score_dir.summary.get("train_run", ""))
    return Run(path).manifest if manifest_problem(path) is None else None


def retrieval_table(
    score_dirs: list[ScoreDir],
    field: str = SOURCE_FIELD,
    n_bootstrap: int = 2000,
    seed: int = 0,
    rows: tuple[dict, dict] | None = None,
) -> pd.DataFrame:
    """One row per method and score function; BM25 and random ranking last.

    Every score directory must hold the same train and test examples (the first is the
    reference order). `rows` = (train rows, test rows) by id; default: the datasets named in the
    first directory's run manifests.
    """
    from gradproj.data import conversation_text  # imports `datasets`, as read_rows does

    reference = score_dirs[0]
    aligned = [reference, *(align_to(reference, d) for d in score_dirs[1:])]
    train_rows, test_rows = rows or dataset_rows(reference)
    source_of = find_sources(test_rows, train_rows, reference, field)
    table = []
    for score_dir in aligned:
        for function in (f for f in FUNCTIONS if f in score_dir.scores):
            ranks = source_ranks(score_dir, function, source_of)
            table.append(
                {"method": method_label(score_dir), "function": function}
                | retrieval_statistics(ranks, n_bootstrap, seed)
                | {"precondition": score_dir.precondition, "damping": score_dir.damping}
            )
    baselines = {
        "bm25": bm25_scores(
            [conversation_text(train_rows[i]) for i in reference.train_ids],
            [conversation_text(test_rows[i]) for i in reference.test_ids],
        ),
        "random": random_scores(len(reference.test_ids), len(reference.train_ids), seed),
    }
    for name, scores in baselines.items():
        ranks = ranks_of_sources(scores, reference.train_ids, reference.test_ids, source_of)
        table.append(
            {"method": name, "function": name}
            | retrieval_statistics(ranks, n_bootstrap, seed)
            | {"precondition": "none", "damping": None}
        )
    return pd.DataFrame(table)


def dataset_rows(score_dir: ScoreDir) -> tuple[dict, dict]:
    """(train rows, test rows) by id, from the datasets the scored runs were extracted from."""
    found = []
    for side in ("train", "test"):
        manifest = score_dir.summary.get(f"{side}_manifest") or {}
        if not manifest.get("dataset"):
            raise UserError(f"{score_dir.path} does not record its {side} dataset; rescore it")
        found.append(read_rows(manifest["dataset"], manifest.get("split") or side))
    return found[0], found[1]
