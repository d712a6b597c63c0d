"""The table of bench/peers/run.py: one row per method, from `gradproj compare --lds`'s lds.csv
and retrieval.csv (so one piece of code computes every LDS), with the paired difference from
gradproj's best gradient ranking recomputed per test example by gradproj.analysis.lds (and
checked against lds.csv), times, memory and storage from the runs' own records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from gradproj.analysis.lds import (
    fused_method,
    lds_methods,
    paired_difference,
    per_test_lds,
)
from gradproj.analysis.retrieval import method_label
from gradproj.scoredir import load_score_dir
from gradproj.truth import load_ground_truth

# Not rerun by run.py (bench/RESULTS.md figures), shown as such.
EXTRACTION_NOTE = (
    "extraction 154 s: one pass writes every gradproj variant (train 118.7 s + test 35.7 s, "
    "idle machine, bench/RESULTS.md 'The demo end to end'); not rerun here"
)
EXTRACTION_S = 154.4
KFAC_ROW = {
    "method": "params kronecker_16x16, 210 modules · kfac (bench/RESULTS.md, not rerun)",
    "tool": "gradproj", "function": "dot", "lds": 0.60, "lds_ci_low": 0.55, "lds_ci_high": 0.64,
    "first": "54 / 54", "mrr": 1.00, "one_off_s": EXTRACTION_S + 2163.0, "scoring_s": 0.9,
    "peak_rss_mib": None, "stored": 53760,
    "note": "kfac factors: a model pass of 2,163 s on the loaded machine (99 s extraction idle); "
    "figures of bench/RESULTS.md issue 22, same ground truth",
}  # fmt: skip


def stored_of(score_dir) -> tuple[float | None, str]:
    """Numbers stored per train example by a gradproj scoring, and what they are."""
    manifest = score_dir.manifest
    projection = manifest.get("projection")
    if projection:
        total = int(projection.get("total_dim") or projection["dim"])
        return total, f"{total} fp32 per example"
    run = Path(score_dir.summary.get("train_run", "")) / "manifest.json"
    try:
        examples = json.loads(run.read_text())["examples"]
        tokens = np.mean([e["tokens"] for e in examples])
        hidden = int(manifest.get("hidden_size") or 576)
        return float(tokens * hidden), f"length x {hidden} (mean {tokens:.0f} tokens)"
    except (OSError, KeyError, ValueError):
        return None, "ragged full gradient"


def fmt(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def seconds(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.0f} s" if value >= 10 else f"{value:.1f} s"


def write(out: Path, report: Path, args) -> pd.DataFrame:
    out = Path(out)
    truth = load_ground_truth(args.ground_truth)
    lds = pd.read_csv(report / "lds.csv")
    retrieval = pd.read_csv(report / "retrieval.csv")
    timings = json.loads((out / "gradproj_timings.json").read_text())
    score_dirs = {p.name: load_score_dir(p) for p in sorted((out / "scores").glob("*/"))}
    ordered = [
        score_dirs[n] for n in sorted(score_dirs, key=lambda n: not n.startswith("gradproj"))
    ]
    methods = lds_methods(truth, ordered, args.seed if hasattr(args, "seed") else 0)
    methods += fused_method(truth, methods)
    per_test = {
        (m.method, m.function): per_test_lds(truth.masks, truth.losses, m.scores) for m in methods
    }
    for row in lds.itertuples():  # the same LDS as compare's, or the table would mislead
        mine = np.nanmean(per_test[(row.method, row.function)])
        assert abs(mine - row.lds) < 1e-9, (row.method, mine, row.lds)

    by_label = {method_label(sd): (name, sd) for name, sd in score_dirs.items()}
    gradproj_rows = [
        r for r in lds.itertuples()
        if r.method in by_label and by_label[r.method][0].startswith("gradproj")
    ]  # fmt: skip
    best = max(gradproj_rows, key=lambda r: r.lds)
    best_values = per_test[(best.method, best.function)]

    rows = []
    for r in lds.itertuples():
        if r.function == "cosine":  # influence is the dot product; cosine stays in lds.csv
            continue
        key = (r.method, r.function)
        found = retrieval[(retrieval.method == r.method) & (retrieval.function == r.function)]
        n = int(r.n_test)
        first = f"{round(found.top1.iloc[0] * n)} / {n}" if len(found) else "-"
        mrr = float(found.mrr.iloc[0]) if len(found) else None
        row = {
            "method": r.method, "function": r.function, "lds": r.lds,
            "lds_ci_low": r.lds_ci_low, "lds_ci_high": r.lds_ci_high, "first": first, "mrr": mrr,
        }  # fmt: skip
        if key != (best.method, best.function):
            pair = paired_difference(
                best_values, per_test[key], getattr(args, "n_bootstrap", 2000), 0
            )
            row.update(diff=pair["difference"], diff_low=pair["ci_low"], diff_high=pair["ci_high"])
        name, sd = by_label.get(r.method, (None, None))
        if r.method in ("bm25", "random"):
            row.update(tool="gradproj", one_off_s=None, scoring_s=None, peak_rss_mib=None,
                       stored=0, note="baseline computed inside gradproj compare")  # fmt: skip
        elif sd is not None and sd.manifest.get("kind") == "peer":
            peer = sd.summary["peer"]
            secs = peer.get("seconds", {})
            row.update(
                tool=peer["tool"], one_off_s=secs.get("one_off"), scoring_s=secs.get("scoring"),
                peak_rss_mib=peer.get("peak_rss_mib"), stored=peer.get("stored_per_train_example"),
                note=peer.get("stored_note", ""),
            )  # fmt: skip
        elif name is not None:
            timing = timings.get(name, {})
            stored, what = stored_of(sd)
            extraction = None if getattr(args, "dry_run", False) else EXTRACTION_S
            one_off = (extraction or 0.0) + timing.get("factorization_s", 0.0) or None
            row.update(
                tool="gradproj", one_off_s=one_off, scoring_s=timing.get("scoring_s"),
                peak_rss_mib=timing.get("peak_rss_mib"), stored=stored, note=what,
            )  # fmt: skip
        else:  # the fused ranking
            row.update(tool="gradproj", one_off_s=None, scoring_s=None, peak_rss_mib=None,
                       stored=None, note="fused: the gram ranking + BM25, z-scored")  # fmt: skip
        rows.append(row)
    if not getattr(args, "dry_run", False):  # figures of the bundled model on the example data
        rows.append(KFAC_ROW)
    for folder in sorted((out / "peers").glob("*/")):
        info = json.loads((folder / "peer.json").read_text())
        if "error" in info:
            rows.append({
                "method": f"{info['tool']} {info.get('version') or ''} · {info.get('method', '-')}",
                "tool": info["tool"], "error": info["error"],
            })  # fmt: skip
    table = pd.DataFrame(rows)
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(markdown(table, best, not getattr(args, "dry_run", False)))
    print((out / "table.md").read_text())
    return table


def markdown(table: pd.DataFrame, best, extraction_note: bool = True) -> str:
    lines = [
        f"gradproj's best gradient ranking: {best.method} ({best.function}); differences are "
        "it minus the row, per test example, paired bootstrap 95% CI.",
        "",
        "| method | LDS [95% CI] | gradproj's best minus it [95% CI] | source first | MRR | "
        "one-off | scoring | peak RSS | stored / train example | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.to_dict("records"):
        if isinstance(r.get("error"), str):
            lines.append(f"| {r['method']} | could not run: {r['error']} |||||||||")
            continue
        lds = f"{fmt(r['lds'])} [{fmt(r['lds_ci_low'])}, {fmt(r['lds_ci_high'])}]"
        diff = "(best)" if pd.isna(r.get("diff")) and r.get("lds_ci_low") is not None else "-"
        if not pd.isna(r.get("diff", float("nan"))):
            diff = f"{r['diff']:+.2f} [{r['diff_low']:+.2f}, {r['diff_high']:+.2f}]"
        if "RESULTS.md" in str(r["method"]):
            diff = "-"
        stored = r.get("stored")
        stored = "-" if stored is None or pd.isna(stored) else f"{stored:,.0f}"
        rss = r.get("peak_rss_mib")
        rss = "-" if rss is None or pd.isna(rss) else f"{rss / 1024:.1f} GiB"
        times = f"{seconds(r.get('one_off_s'))} | {seconds(r.get('scoring_s'))}"
        lines.append(
            f"| {r['method']} ({r.get('function', '')}) | {lds} | {diff} | {r.get('first', '-')} "
            f"| {fmt(r.get('mrr'))} | {times} | {rss} | {stored} | {r.get('note', '')} |"
        )
    if extraction_note:
        lines += ["", "gradproj's one-off column adds its " + EXTRACTION_NOTE + "."]
    return "\n".join(lines) + "\n"
