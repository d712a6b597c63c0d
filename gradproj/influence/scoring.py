"""The scoring of two runs, from a config: `compute_scores`, which `gradproj score` and
`gradproj query` share, and `score_influence`, which writes the score directory."""

from __future__ import annotations

import sys
from pathlib import Path

from gradproj import curvature, fsio, scoredir, store
from gradproj.influence.config import ScoreConfig
from gradproj.influence.kernel import STORED_ZERO, Scorer, Scoring, topk_positions
from gradproj.influence.mapped import write_mapped_folder
from gradproj.influence.memory import plan_memory, reserve
from gradproj.influence.provenance import (
    check_compatible,
    open_run,
    output_dir,
    scoring_summary,
    up_to_date,
    warn_truncation,
)


def warn_excluded(excluded: dict[str, list[dict]]) -> None:
    """Warn about the exclusions scoring found itself. Those the extraction skipped were warned
    about by the extraction and are listed in summary.json: scoring the same runs at several
    dims does not repeat them (the demo said the same example seven times)."""
    for role, items in excluded.items():
        items = [e for e in items if e["reason"] == STORED_ZERO]
        if items:
            named = ", ".join(f"{e['id']} ({e['reason']})" for e in items[:10])
            more = f" and {len(items) - 10} more" if len(items) > 10 else ""
            print(
                f"warning: {len(items)} {role} example(s) excluded: {named}{more}", file=sys.stderr
            )


def preconditioner(cfg: ScoreConfig, train: store.Run) -> tuple[curvature.Whitener, dict]:
    """The Whitener of `--precondition` (its stored factorization, else computed and stored),
    and its entry in summary.json."""
    path = Path(cfg.curvature or curvature.default_path(train.path, cfg.precondition))
    factorization = curvature.load_or_compute(cfg.precondition, train, path, cfg.device)
    whitener = curvature.make_whitener(factorization, cfg.damping, cfg.device)
    return whitener, {
        "kind": cfg.precondition,
        "damping": cfg.damping,
        "lambda": "damping x the block's mean eigenvalue",
        "curvature_file": str(path.resolve()),
        "curvature_sha256": fsio.file_sha256(path),
        "blocks": factorization.blocks.count,
        "block_dim": factorization.blocks.k,
        "bytes": whitener.nbytes,
    }


def compute_scores(cfg: ScoreConfig, train: store.Run, test: store.Run) -> Scoring:
    """Every test example of `test` against every train example of `train`, as `cfg` asks: the
    one computation of `gradproj score` and `gradproj query`."""
    check_compatible(train, test)
    plan = plan_memory(cfg, train, test)
    whitener = whitening = None
    if cfg.precondition != "none":
        plan = reserve(plan, curvature.factorization_bytes(train, cfg.precondition))
        whitener, whitening = preconditioner(cfg, train)
    return Scoring(Scorer(cfg, train, test, plan, whitener).run(), plan, whitening)


def score_influence(cfg: ScoreConfig) -> tuple[Path, bool]:
    """Score the runs, write the score directory (replacing it whole); return its path and
    whether it was written. A directory that already holds this scoring of the runs as they are
    now is kept: scores are deterministic, so rescoring would write the same bytes."""
    train, test = open_run(cfg.train, "train"), open_run(cfg.test, "test")
    check_compatible(train, test)  # before the output's lock is made (compute_scores repeats it)
    warn_truncation(train, test)
    out = output_dir(cfg, train, test)
    with scoredir.exclusive_output(out):  # before the compute: a second writer fails at once
        scoredir.check_replaceable(out)
        if up_to_date(out, cfg, train, test):
            return out, False
        scoring = compute_scores(cfg, train, test)
        scores = scoring.scores
        warn_excluded(scores.excluded)

        def build(folder: Path) -> None:
            ids = (scores.train_ids, scores.test_ids)
            scoredir.write_scores(folder, scores.matrices, *ids, train.path, test.path)
            positions = topk_positions(scores, cfg.top_k)
            lines = scoredir.topk_lines(scores.matrices, *ids, scores.test_index, positions)
            scoredir.write_topk(folder, lines)
            scoredir.write_summary(folder, scoring_summary(cfg, scoring, train, test))
            if cfg.mapped:
                write_mapped_folder(folder, cfg, scores, train)

        fsio.replace_dir(out, build)
    return out, True
