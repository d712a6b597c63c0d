"""Every peer and gradproj on the same work, in one table (issue 32).

Run from the repository root with gradproj's venv:

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/peers/run.py --out bench/peers/out \
        --gradients DEMO/gradients

1. prepare.py: the ground truth's train and test examples, tokenized as gradproj does, into
   OUT/data.json (what every peer reads).
2. Each peer's runner (run_kronfluence.py, run_dattri.py, ...) in the peers' own venv
   (`--peers_python`, default bench/peers/.venv/bin/python; peers are never gradproj
   dependencies), logging to OUT/logs/; each leaves OUT/peers/<name>/ (result.npz + peer.json,
   or peer.json with the error it gave). A peer whose package does not import is recorded as
   not installed. `--reuse` keeps results already there.
3. adapter.py writes each result as a score directory OUT/scores/<name>.
4. gradproj scores the runs of an extraction of the same examples (`--gradients`: the
   demo's layout, e.g. scripts/demo.sh's output) with `gradproj score`, each call timed, and
   `gradproj compare --lds` computes LDS and retrieval of every score directory, peers
   included, with BM25 and random.
5. table.md / table.csv: LDS [95% CI], the paired difference from gradproj's best gradient
   ranking [paired 95% CI], retrieval of the source (first, MRR), wall time split into one-off
   work and scoring, peak resident memory, numbers stored per train example.

`--dry-run` runs the whole chain on the first few examples (`--limit`), with the peers'
smallest settings, to check that it runs end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

# name -> (module the peer's package imports as, runner script, its arguments, dry-run arguments)
PEERS = {
    "kronfluence": ("kronfluence", "run_kronfluence.py", [], ["--strategies", "identity"]),
    "dattri": ("dattri", "run_dattri.py", [], ["--proj_dim", "16"]),
    "trak": ("trak", "run_trak.py", [], ["--proj_dim", "32"]),
    "bergson": ("bergson", "run_bergson.py", [], []),
}


def gradproj_rows(args) -> dict:
    """gradproj's rows: score directory name -> (run variant, score options)."""
    rows = {
        f"gradproj_{args.params_variant}": (args.params_variant, []),
        f"gradproj_{args.params_variant}_gram": (args.params_variant, ["--precondition", "gram"]),
        # both functions: gradproj compare's theory table needs the reference's cosine
        "gradproj_embeddings_full": ("full", ["--func", "both"]),
    }
    for dim in args.embedding_dims.split(","):
        rows[f"gradproj_embeddings_rademacher_{dim}"] = (f"rademacher_{dim}", ["--func", "both"])
    return rows


def timed(command: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `command` under /usr/bin/time: its wall seconds, peak resident MiB and exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    stats = log.with_suffix(".time")
    wrapper = (
        ["/usr/bin/time", "-o", str(stats), "-f", "%e %M"] if Path("/usr/bin/time").exists() else []
    )
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call([*wrapper, *command], stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    rss = None
    if wrapper and stats.exists():
        fields = stats.read_text().split()
        if len(fields) >= 2:
            rss = float(fields[-1]) / 1024
    return {"wall_s": wall, "peak_rss_mib": rss, "returncode": code}


def peer_available(python: Path, module: str) -> str | None:
    """None when `module` imports in the peers' venv, else why not (one line)."""
    if not python.exists():
        return f"not installed: no peers venv at {python} (bash bench/peers/setup.sh makes it)"
    probe = subprocess.run(
        [str(python), "-c", f"import {module}"], capture_output=True, text=True, timeout=600
    )
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"does not import in the peers' venv: {last[:200]}"
    return None


def run_peers(args, out: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the peers never see gradproj
    for name in args.peers:
        module, script, extra, dry = PEERS[name]
        existing = sorted((out / "peers").glob(f"{name}_*/peer.json"))
        if args.reuse and existing:
            print(f"{name}: reusing {len(existing)} result(s)", flush=True)
            continue
        for old in existing:  # a rerun replaces this peer's results, and only its own
            shutil.rmtree(old.parent)
        reason = peer_available(Path(args.peers_python), module)
        if reason is None and not (HERE / script).exists():
            reason = f"no runner {script} in bench/peers"
        if reason:
            folder = out / "peers" / f"{name}_unavailable"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "peer.json").write_text(
                json.dumps({"tool": name, "version": None, "method": "-", "error": reason})
            )
            print(f"{name}: skipped ({reason})", flush=True)
            continue
        command = [args.peers_python, str(HERE / script), "--out", str(out), *extra]
        if args.dry_run:
            command += dry
        print(f"{name}: running {' '.join(command)}", flush=True)
        result = timed(command, out / "logs" / f"{name}.log", env)
        print(f"{name}: exit {result['returncode']}, {result['wall_s']:.0f} s", flush=True)


def adapt_peers(out: Path, like: Path) -> list[Path]:
    from adapter import from_result

    dirs = []
    for folder in sorted((out / "peers").glob("*/")):
        if (folder / "result.npz").exists():
            try:
                dirs.append(from_result(folder, out / "scores" / folder.name, like))
            except ValueError as err:  # a matrix that does not fit its ids: the peer's result
                info = json.loads((folder / "peer.json").read_text())
                info["error"] = f"its scores do not fit the examples: {err}"
                (folder / "peer.json").write_text(json.dumps(info, indent=1))
                (folder / "result.npz").rename(folder / "result.unusable.npz")
                print(f"{folder.name}: {info['error']}", flush=True)
    return dirs


def gradproj_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gradproj", *args]


def run_gradproj(args, out: Path) -> dict:
    """Score the extraction's runs, each call timed; returns {score dir name: timing}."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    timings = {}
    work = json.loads((out / "data.json").read_text())
    model = work["checkpoint"]
    stems = Path(args.train_dataset).stem, Path(args.test_dataset).stem
    for name, (variant, options) in gradproj_rows(args).items():
        run = Path(args.gradients) / variant / model
        train, test = run / stems[0] / "train" / "0", run / stems[1] / "test" / "0"
        if not (train / "manifest.json").exists():
            print(f"{name}: no run {train}; left out", flush=True)
            continue
        target = out / "scores" / name
        command = [
            sys.executable, str(HERE / "score_timed.py"), "--train", str(train),
            "--test", str(test), "--output", str(target), *options,
        ]  # fmt: skip
        if "--precondition" in options:  # its factorization computed here, timed, not reused
            command += ["--curvature", str(out / "curvature" / f"{variant}_gram.safetensors")]
        log = out / "logs" / f"{name}.log"
        timings[name] = timed(command, log, env)
        if timings[name]["returncode"]:
            raise SystemExit(f"{name}: gradproj score failed; see {log}")
        timings[name].update(json.loads(log.read_text().strip().splitlines()[-1]))
        print(f"{name}: {timings[name]['scoring_s']:.1f} s scoring", flush=True)
    (out / "gradproj_timings.json").write_text(json.dumps(timings, indent=1))
    return timings


def run_compare(args, out: Path, peer_dirs: list[Path]) -> Path:
    scores = out / "scores"
    reference = scores / "gradproj_embeddings_full"
    candidates = sorted(scores.glob("gradproj_embeddings_rademacher_*"))
    others = sorted(scores.glob(f"gradproj_{args.params_variant}*")) + peer_dirs
    report = out / "compare"
    command = gradproj_cli(
        "compare", "--reference", str(reference), "--candidates", *map(str, candidates),
        "--retrieval_methods", *map(str, others), "--lds", str(args.ground_truth),
        "--output", str(report), "--n_permutations", str(args.n_permutations),
        "--top_k", "10", "--n_bootstrap", str(args.n_bootstrap),
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = timed(command, out / "logs" / "compare.log", env)
    if result["returncode"]:
        raise SystemExit(f"gradproj compare failed; see {out / 'logs' / 'compare.log'}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default=str(HERE / "out"))
    parser.add_argument(
        "--gradients", required=True, help="an extraction of the examples (demo layout)"
    )
    parser.add_argument(
        "--ground_truth", default=str(ROOT / "examples" / "ground_truth.safetensors")
    )
    parser.add_argument("--train_dataset", default=str(ROOT / "examples" / "data" / "train.jsonl"))
    parser.add_argument("--test_dataset", default=str(ROOT / "examples" / "data" / "test.jsonl"))
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--params_variant", default="params_kronecker_16x16")
    parser.add_argument("--embedding_dims", default="4096", help="rademacher dims, comma-separated")
    parser.add_argument("--n_bootstrap", type=int, default=2000)
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated")
    parser.add_argument("--peers_python", default=str(HERE / ".venv" / "bin" / "python"))
    parser.add_argument("--reuse", action="store_true", help="keep peer results already in OUT")
    parser.add_argument("--skip_gradproj", action="store_true", help="reuse OUT/scores/gradproj_*")
    parser.add_argument("--n_permutations", type=int, default=1000)
    parser.add_argument("--dry-run", dest="dry_run", action="store_true")
    parser.add_argument("--limit", type=int, default=0, help="first N examples (prepare.py)")
    args = parser.parse_args(argv)
    args.peers = [p for p in args.peers.split(",") if p]
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import prepare

    prepare.main([
        "--out", str(out), "--model", args.model, "--ground_truth", str(args.ground_truth),
        "--train_dataset", args.train_dataset, "--test_dataset", args.test_dataset,
        "--max_seq_length", str(args.max_seq_length),
        *(["--limit", str(args.limit)] if args.limit else []),
    ])  # fmt: skip
    run_peers(args, out)
    if not args.skip_gradproj:
        run_gradproj(args, out)
    peer_dirs = adapt_peers(out, out / "scores" / "gradproj_embeddings_full")
    report = run_compare(args, out, peer_dirs)
    import table

    table.write(out, report, args)


if __name__ == "__main__":
    main()
