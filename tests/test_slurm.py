"""extract_grads.sbatch on a real local SLURM cluster; job-array ranges and preemption.

The cluster tests submit the tiny test model on CPU (`sbatch --gres=none`) and compare every
shard's bytes with a direct run of extract_gradients.py. They skip, with the reason, where no
cluster can be started (see tests/slurm_cluster.py); the range tests need no SLURM.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradproj import extract, store
from gradproj.cli import extract_main as main
from gradproj.errors import UserError
from tests.conftest import REPO, conversations, write_jsonl
from tests.slurm_cluster import FINAL_STATES, slurm_cluster  # noqa: F401

SBATCH = REPO / "extract_grads.sbatch"
SMALL = ["--max_seq_length", "40", "--device", "cpu"]
# The script's #SBATCH defaults ask for a GPU, 8 CPUs and 64G; this node has 2 CPUs, no GPU.
RESOURCES = ["--gres=none", "--mem=2G", "--cpus-per-task=1", "--time=10"]
ARRAY_ENV = ("ID", "MIN", "MAX", "COUNT", "STEP")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """13 conversations (two too long for 40 tokens, so shards record skipped examples)."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", conversations(13, 5))


def direct(model, data, out, *extra) -> None:
    """The extraction without SLURM, in this process."""
    argv = [str(model), str(data), "0", "--gradients_output_path", str(out), *SMALL, *extra]
    assert main(argv) == 0


def snapshot(root: Path) -> tuple[dict, dict]:
    """Every shard's bytes, and what each manifest says about the examples and shards.

    Manifests legitimately differ in `options` (--start/--end of whoever merged last)."""
    assert not list(root.rglob(".shard-*")), "a temporary shard directory was left behind"
    assert not list(root.rglob("*.tmp")), "a temporary manifest was left behind"
    shards = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}
    manifests = {}
    for path in sorted(root.rglob(store.MANIFEST)):
        m = json.loads(path.read_text())
        manifests[str(path.parent.relative_to(root))] = (
            m["complete"],
            m["examples"],
            m["skipped"],
            [(s["file"], s["sha256"]) for s in m["shards"]],
        )
    return shards, manifests


def assert_same_run(got: Path, want: Path) -> None:
    got_shards, got_manifests = snapshot(got)
    want_shards, want_manifests = snapshot(want)
    assert sorted(got_shards) == sorted(want_shards)
    for name, content in want_shards.items():
        assert got_shards[name] == content, f"{name} differs from the direct run"
    assert got_manifests == want_manifests
    assert all(complete for complete, *_ in got_manifests.values())


def cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "extract_gradients.py"), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


# --- ranges without SLURM -------------------------------------------------------------------


def set_array(monkeypatch, **env) -> None:
    for key in ARRAY_ENV:
        monkeypatch.delenv(f"SLURM_ARRAY_TASK_{key}", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(f"SLURM_ARRAY_TASK_{key.upper()}", str(value))


def config(**kw) -> extract.ExtractConfig:
    return extract.ExtractConfig(model="m", dataset="d", device="cpu", **kw)


def assert_partition(ranges: list[tuple[int, int]], n: int, per_file: int, what="") -> None:
    """Contiguous, in order, non-overlapping, covering 0..n, bounds on shard boundaries."""
    shards = [s for a, b in ranges for s in store.shard_ranges(a, b, per_file) if a < b]
    assert shards == store.shard_ranges(0, n, per_file), what
    bounds = [x for a, b in ranges if a < b for x in (a, b)]
    assert all(x % per_file == 0 or x == n for x in bounds), what


@pytest.mark.parametrize("n", [0, 1, 5, 13, 100, 1001])
@pytest.mark.parametrize("per_file", [1, 3, 1000])
@pytest.mark.parametrize("tasks", [1, 2, 4, 7, 64])
def test_array_tasks_partition_the_shards(monkeypatch, n, per_file, tasks):
    cfg = config(gradients_per_file=per_file)
    layouts = {  # how `--array` spells `tasks` tasks, and which variables SLURM sets
        "0-N": [dict(id=i, min=0, max=tasks - 1, count=tasks, step=1) for i in range(tasks)],
        "count only": [dict(id=i, count=tasks) for i in range(tasks)],
        "min/max only": [dict(id=i, min=0, max=tasks - 1) for i in range(tasks)],
        "1-N": [dict(id=i + 1, min=1, max=tasks, count=tasks) for i in range(tasks)],
        "5-X:3%2": [
            dict(id=5 + 3 * i, min=5, max=5 + 3 * (tasks - 1), count=tasks, step=3)
            for i in range(tasks)
        ],
    }
    for name, envs in layouts.items():
        ranges = []
        for env in envs:
            set_array(monkeypatch, **env)
            ranges.append(extract.task_range(cfg, n))
        assert_partition(ranges, n, per_file, name)
        assert all(a == b == n for a, b in ranges if a == b), f"{name}: an empty task gets n..n"


def test_array_that_is_not_evenly_spaced_is_refused(monkeypatch):
    set_array(monkeypatch, id=5, min=1, max=9, count=3, step=1)  # --array=1,5,9
    with pytest.raises(UserError, match="--array=0-N"):
        extract.task_range(config(gradients_per_file=3), 13)


@pytest.mark.parametrize("cuts", [(5,), (3, 6), (1, 2, 12), (0, 13), (7, 7, 20)])
def test_explicit_ranges_that_partition_the_examples_partition_the_shards(monkeypatch, cuts):
    set_array(monkeypatch)
    bounds = [None, *cuts, None]
    ranges = [
        extract.task_range(config(gradients_per_file=3, start=a, end=b), 13)
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    assert_partition(ranges, 13, 3)


@pytest.mark.slow
def test_start_end_of_two_processes_union_to_a_full_run(tiny_llama, dataset, tmp_path):
    """Two concurrent processes (no SLURM) with --start/--end write one run directory."""
    direct(tiny_llama, dataset, tmp_path / "ref", "--gradients_per_file", "3")
    out = tmp_path / "split"
    base = [sys.executable, str(REPO / "extract_gradients.py"), str(tiny_llama), str(dataset), "0",
            "--gradients_output_path", str(out), "--gradients_per_file", "3", *SMALL]  # fmt: skip
    procs = [
        subprocess.Popen([*base, *rng], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for rng in (["--end", "5"], ["--start", "5"])  # 5 is no shard boundary: rounded up to 6
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "rounded up to shard boundaries (multiples of 3): 0..6 of 13" in logs[0]
    assert_same_run(out, tmp_path / "ref")


def test_array_task_without_shard_exits_cleanly(monkeypatch, tiny_llama, dataset, tmp_path, capsys):
    set_array(monkeypatch, id=0, min=0, max=5, count=6)  # 6 tasks, 5 shards: task 0 gets none
    direct(tiny_llama, dataset, tmp_path, "--gradients_per_file", "3")
    assert "no shard left for this task" in capsys.readouterr().out
    assert not list(tmp_path.rglob("*.safetensors"))
    set_array(monkeypatch, id=1, min=0, max=1, count=2)  # store_mean is one job's work
    direct(tiny_llama, dataset, tmp_path, "--mode", "store_mean")
    assert "array task 0 computes it" in capsys.readouterr().out


# --- on the local SLURM cluster --------------------------------------------------------------


@pytest.fixture
def cluster(slurm_cluster, monkeypatch):  # noqa: F811
    set_array(monkeypatch)
    return slurm_cluster


def job_env(cluster, **extra) -> dict:
    """What a user sets: the venv's python, the checkout, offline hub."""
    return cluster.environ(
        GRADPROJ_PYTHON=sys.executable, GRADPROJ_HOME=str(REPO), HF_HUB_OFFLINE="1", **extra
    )


def sbatch_args(model, data, out, *extra, positional=("0", "train", "sft", "store")):
    return [*RESOURCES, str(SBATCH), str(model), str(data), *positional, *extra,
            "--gradients_output_path", str(out), *SMALL]  # fmt: skip


def job_log(cwd: Path, job_id: str) -> str:
    return "\n".join(p.read_text() for p in sorted(cwd.glob(f"slurm-{job_id}*.out")))


def wait_for(condition, what: str, timeout: float = 180, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(poll)
    return result


@pytest.mark.slow
@pytest.mark.slurm
def test_one_job_with_the_original_arguments_matches_a_direct_run(
    cluster, tiny_llama, dataset, tmp_path
):
    args = ("--random_projection", "full,16", "rademacher,normal", "--gradients_per_file", "3")
    direct(tiny_llama, dataset, tmp_path / "ref", "--dataset_split", "train", "--paradigm", "sft",
           "--mode", "store", "--random_projection", "--proj_dim", "full,16", "--proj_type",
           "rademacher,normal", "--gradients_per_file", "3")  # fmt: skip
    job, cp = cluster.submit(
        sbatch_args(tiny_llama, dataset, tmp_path / "job", *args),
        cwd=tmp_path,
        env=job_env(cluster),
    )
    assert job is not None, cp.stderr
    assert cp.returncode == 0, job_log(tmp_path, job)
    assert cluster.job_state(job) == "COMPLETED"
    assert_same_run(tmp_path / "job", tmp_path / "ref")
    assert len(list((tmp_path / "job").rglob(store.MANIFEST))) == 3  # full, rademacher, normal


@pytest.mark.slow
@pytest.mark.slurm
def test_array_of_four_tasks_equals_one_direct_run(cluster, tiny_llama, dataset, tmp_path):
    args = ("--random_projection", "full,16", "--gradients_per_file", "3")
    direct(tiny_llama, dataset, tmp_path / "ref", "--random_projection", "--proj_dim", "full,16",
           "--gradients_per_file", "3")  # fmt: skip
    job, cp = cluster.submit(
        ["--array=0-3", *sbatch_args(tiny_llama, dataset, tmp_path / "job", *args)],
        cwd=tmp_path,
        env=job_env(cluster),
    )
    assert job is not None, cp.stderr
    assert cluster.job_state(job) == "COMPLETED", (cluster.job_states(job), job_log(tmp_path, job))
    assert set(cluster.job_states(job)) == {f"{job}_{i}" for i in range(4)}
    logs = [job_log(tmp_path, f"{job}_{i}") for i in range(4)]
    # 13 examples in shards of 3: five shards shared 1, 1, 1, 2 among the four tasks
    for log, (a, b) in zip(logs, [(0, 3), (3, 6), (6, 9), (9, 13)], strict=True):
        assert f"done: examples {a}..{b}:" in log, log
    assert_same_run(tmp_path / "job", tmp_path / "ref")
    verify = cli("--verify", tmp_path / "job")  # both runs below that directory
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.count(": complete: 5 shard(s), 11 gradient(s), 2 skipped") == 2


def stop_after_first_shard(
    cluster, tmp_path, tiny_llama, dataset, stop, sig="SIGTERM"
) -> tuple[str, Path]:
    """Submit a job of 13 one-example shards and call `stop(job)` once it has written the first.

    The test holds the manifest lock, so the job waits after its first shard until the signal
    has been forwarded: the stop lands mid-run whatever the machine's speed."""
    out = tmp_path / "job"
    run_dir = out / "full" / tiny_llama.name / dataset.stem / "train" / "0"
    with store.run_lock(run_dir):  # the job blocks right after its first shard
        job, cp = cluster.submit(
            sbatch_args(tiny_llama, dataset, out, "--gradients_per_file", "1"),
            cwd=tmp_path,
            env=job_env(cluster),
            wait=False,
        )
        assert job is not None, cp.stderr
        wait_for(lambda: (run_dir / "0_1.safetensors").exists(), "first shard")
        stop(job)
        wait_for(
            lambda: f"{sig} forwarded to the extraction" in job_log(tmp_path, job),
            "signal forwarded by the batch script",
            timeout=60,
        )
    return job, run_dir


def assert_stopped_cleanly(log: str, run_dir: Path, sig="SIGTERM") -> None:
    assert f"stopped by {sig}" in log and "To resume, rerun the same command" in log, log
    assert "1 of 13 shard(s) of examples 0..13 done" in log, log
    assert not list(run_dir.glob(".shard-*")), "temporary shard left behind"


@pytest.mark.slow
@pytest.mark.slurm
def test_job_stopped_by_sigterm_leaves_no_partial_shard_and_resumes(
    cluster, tiny_llama, dataset, tmp_path
):
    direct(tiny_llama, dataset, tmp_path / "ref", "--gradients_per_file", "1")

    def scancel(job):  # TERM to the batch shell only: it must forward it to python
        cp = cluster.run(["scancel", "--batch", "--signal=TERM", job])
        assert cp.returncode == 0, cp.stderr

    job, run_dir = stop_after_first_shard(cluster, tmp_path, tiny_llama, dataset, scancel)
    assert cluster.job_state(job) == "FAILED"  # exit status 128 + SIGTERM
    assert_stopped_cleanly(job_log(tmp_path, job), run_dir)
    assert sorted(p.name for p in run_dir.glob("*.safetensors")) == ["0_1.safetensors"]
    assert store.check_shard(run_dir / "0_1.safetensors") is not None
    manifest = store.Run(run_dir).manifest
    assert not manifest.complete
    assert [s["file"] for s in manifest.shards] == ["0_1.safetensors"]
    verify = cli("--verify", run_dir)
    assert verify.returncode == 1 and "INCOMPLETE: 1 complete, 12 missing" in verify.stdout

    again, cp = cluster.submit(  # the same submission resumes
        sbatch_args(tiny_llama, dataset, tmp_path / "job", "--gradients_per_file", "1"),
        cwd=tmp_path,
        env=job_env(cluster),
    )
    assert cluster.job_state(again) == "COMPLETED", job_log(tmp_path, again)
    assert "1 shard(s) already present" in job_log(tmp_path, again)
    assert_same_run(tmp_path / "job", tmp_path / "ref")


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.parametrize("how", ["scontrol requeue", "SIGUSR1 before the time limit"])
def test_requeued_job_resumes_where_it_stopped(cluster, tiny_llama, dataset, tmp_path, how):
    direct(tiny_llama, dataset, tmp_path / "ref", "--gradients_per_file", "1")
    sig = "SIGTERM" if how == "scontrol requeue" else "SIGUSR1"

    def stop(job):
        if how == "scontrol requeue":  # SLURM signals every process of the job, then requeues it
            cp = cluster.run(["scontrol", "requeue", job])
        else:  # what --signal=B:USR1@300 sends: the batch script stops python, then requeues
            cp = cluster.run(["scancel", "--batch", "--signal=USR1", job])
        assert cp.returncode == 0, cp.stderr

    job, run_dir = stop_after_first_shard(cluster, tmp_path, tiny_llama, dataset, stop, sig)

    hurried = []

    def restarted():
        (record,) = cluster.job_records(job)
        state = record.get("JobState")
        if state == "PENDING" and not hurried:
            # A requeued job waits 120 s (BeginTime). Start it sooner, but not within the second
            # its old credential was revoked in, or slurmd refuses it ("Job credential revoked").
            cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"])
            hurried.append(True)
        return int(record.get("Restarts", 0)) >= 1 and state not in ("PENDING", "COMPLETING")

    wait_for(restarted, "requeued job restarted", timeout=120, poll=0.5)
    assert cluster.job_state(job) == "COMPLETED"
    log = job_log(tmp_path, job)  # --open-mode=append: both runs of the job
    assert_stopped_cleanly(log.split("done: examples")[0], run_dir, sig)
    assert "1 shard(s) already present" in log, log
    assert_same_run(tmp_path / "job", tmp_path / "ref")


@pytest.mark.slow
@pytest.mark.slurm
def test_gpu_request_fails_at_submission_and_docs_say_how_to_override(
    cluster, tiny_llama, dataset, tmp_path
):
    no_gres_override = [a for a in sbatch_args(tiny_llama, dataset, tmp_path) if a != "--gres=none"]
    job, cp = cluster.submit(no_gres_override, cwd=tmp_path, env=job_env(cluster))
    assert job is None and cp.returncode != 0
    assert "Invalid generic resource" in cp.stderr, cp.stderr
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert any("sbatch --gres=none" in p.read_text() for p in docs if p.is_file())
