"""SIGKILL at seeded random moments, rerun each time: the same bytes as one uninterrupted run.

Each command runs as a subprocess; one uninterrupted run measures how long a run takes, then
each of 10 runs is killed at a moment drawn uniformly from that span (so some die while
importing, some while computing, some while writing or merging), and a final run completes.
"""

import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from gradproj.cli import extract_main, score_main
from gradproj.errors import run_cli
from tests.conftest import REPO, conversations, write_jsonl

KILLS = 10
LEFTOVER_MARKS = (".shard-", ".tmp", ".staging-", ".old-")


def tree(root) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def leftovers(*roots) -> list[str]:
    return [
        str(p) for root in roots for p in root.rglob("*")
        if any(mark in p.name for mark in LEFTOVER_MARKS)
    ]  # fmt: skip


def start(script: str, argv: list[str]) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, script, *argv], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def complete(script: str, argv: list[str]) -> float:
    began = time.time()
    proc = start(script, argv)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return time.time() - began


def kill_and_rerun(script: str, argv: list[str], span: float, seed: int) -> list[float]:
    """KILLS runs, each SIGKILLed at a seeded moment of `span`, then one run to completion."""
    rng = random.Random(seed)
    moments = [rng.uniform(0, span) for _ in range(KILLS)]
    for moment in moments:
        proc = start(script, argv)
        try:
            proc.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        proc.communicate()
    complete(script, argv)
    return moments


@pytest.mark.slow
def test_extraction_killed_ten_times_ends_byte_identical(tiny_llama, tmp_path):
    dataset = write_jsonl(tmp_path / "sft.jsonl", conversations(8, long_every=5))
    out = tmp_path / "g"
    argv = [str(tiny_llama), str(dataset), "0", "--gradients_output_path", str(out),
            "--max_seq_length", "40", "--gradients_per_file", "2",
            "--random_projection", "--proj_dim", "full,16"]  # fmt: skip
    span = complete("extract_gradients.py", argv)
    reference = tree(out)
    out.rename(tmp_path / "reference")
    kill_and_rerun("extract_gradients.py", argv, span, seed=14)
    assert leftovers(out) == []
    assert tree(out) == reference


@pytest.fixture
def runs(tiny_llama, tmp_path):
    """Train and test runs (rademacher_16), made in this process."""
    paths = {}
    for role, n in (("train", 13), ("test", 5)):
        dataset = write_jsonl(tmp_path / f"{role}.jsonl", conversations(n))
        argv = [str(tiny_llama), str(dataset), "0", "--gradients_output_path", str(tmp_path / "g"),
                "--max_seq_length", "40", "--gradients_per_file", "4",
                "--random_projection", "--proj_dim", "16"]  # fmt: skip
        assert extract_main(argv) == 0
        paths[role] = tmp_path / "g" / "rademacher_16" / tiny_llama.name / role / "train" / "0"
    return paths


@pytest.mark.slow
def test_scoring_killed_ten_times_ends_byte_identical(runs, tmp_path):
    out = tmp_path / "scores" / "both"
    argv = ["--train", str(runs["train"]), "--test", str(runs["test"]), "--output", str(out),
            "--mapped", "--device", "cpu", "--memory_gb", "1"]  # fmt: skip
    # a fixed --memory_gb: the default budget, written to summary.json, follows free memory
    span = complete("score_influence.py", argv)
    reference = tree(out)
    out.rename(tmp_path / "reference")
    kill_and_rerun("score_influence.py", argv, span, seed=41)
    assert leftovers(out.parent) == []
    assert tree(out) == reference


# --- Scorings that collide (issue 25): forked processes, so that 40 start in seconds ---

PAIRS = 20
TERMS = 10


def fork_scoring(argv: list[str], log) -> multiprocessing.Process:
    """`gradproj score ARGV` in a forked process, run as the CLI runs it (exit status, one-line
    errors into `log`); one torch thread: the parent's thread pool does not survive a fork."""

    def target():
        import torch

        torch.set_num_threads(1)
        sys.stderr = sys.stdout = open(log, "w")  # noqa: SIM115 (closed by the exit)
        run_cli(lambda: score_main(argv))

    process = multiprocessing.get_context("fork").Process(target=target)
    process.start()
    return process


def scored_tree(runs, out, top_k: str) -> tuple[list[str], dict]:
    """The argv of a scoring into `out`, and the files it writes there when run alone (then
    removed: summary.json names the output, so references are made in the same place)."""
    argv = ["--train", str(runs["train"]), "--test", str(runs["test"]), "--device", "cpu",
            "--memory_gb", "1", "--top_k", top_k, "--mapped", "--output", str(out)]  # fmt: skip
    assert score_main(argv) == 0
    reference = tree(out)
    shutil.rmtree(out)
    return argv, reference


@pytest.mark.slow
def test_concurrent_scorings_into_one_output_leave_one_complete_scoring(runs, tmp_path):
    """20 times, two scorings (different --top_k) start together into one --output: each ends
    with one of them complete there (a loser fails at once, naming the lock), never a mix."""
    out = tmp_path / "scores" / "shared"
    argvs, references = {}, {}
    for name, top_k in (("a", "3"), ("b", "5")):
        argvs[name], references[name] = scored_tree(runs, out, top_k)
    outcomes = []
    for i in range(PAIRS):
        logs = {name: tmp_path / f"{name}{i}.log" for name in argvs}
        procs = {name: fork_scoring(argvs[name], logs[name]) for name in argvs}
        for proc in procs.values():
            proc.join(timeout=120)
        codes = {name: proc.exitcode for name, proc in procs.items()}
        outcomes.append(tuple(sorted(codes.values())))
        assert set(codes.values()) <= {0, 2} and 0 in codes.values(), codes
        for name, code in codes.items():
            if code == 2:
                assert "error: another scoring is writing --output" in logs[name].read_text()
        assert tree(out) in [references[n] for n, code in codes.items() if code == 0]
        assert leftovers(out.parent) == []
    print("exit codes per pair:", outcomes)


def test_scoring_stopped_by_sigterm_leaves_the_previous_or_the_new_scoring(runs, tmp_path):
    """SIGTERM at seeded random moments of a scoring that replaces a previous one: the output
    is the previous scoring or the new one, complete, and no staging directory is left."""
    out = tmp_path / "scores" / "replaced"
    argv_old, previous = scored_tree(runs, out, "3")
    argv_new, new = scored_tree(runs, out, "5")
    began = time.time()
    proc = fork_scoring(argv_new, tmp_path / "timed.log")
    proc.join(timeout=120)
    span = time.time() - began
    rng, seen = random.Random(25), []
    for i in range(TERMS):
        assert score_main(argv_old) == 0
        proc = fork_scoring(argv_new, tmp_path / f"term{i}.log")
        proc.join(timeout=rng.uniform(0, span))
        if proc.exitcode is None:
            os.kill(proc.pid, signal.SIGTERM)
        proc.join(timeout=120)
        # 0: done before the signal; 143: stopped by it; -15: killed before scoring began
        assert proc.exitcode in (0, 128 + signal.SIGTERM, -signal.SIGTERM), proc.exitcode
        assert tree(out) == new if proc.exitcode == 0 else tree(out) in (previous, new)
        assert leftovers(out.parent) == []
        seen.append(proc.exitcode)
    print("exit codes:", seen)
