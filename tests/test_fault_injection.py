"""SIGKILL at seeded random moments, rerun each time: the same bytes as one uninterrupted run.

Each command runs as a subprocess; one uninterrupted run measures how long a run takes, then
each of 10 runs is killed at a moment drawn uniformly from that span (so some die while
importing, some while computing, some while writing or merging), and a final run completes.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from gradproj.cli import extract_main
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
