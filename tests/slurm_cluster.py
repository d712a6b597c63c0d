"""A real single-node SLURM cluster on loopback, as a session-scoped pytest fixture.

Import the fixture from conftest.py::

    from tests.slurm_cluster import slurm_cluster  # noqa: F401

The fixture runs ``scripts/slurm_local.sh start`` (idempotent: about 0.3 s when the cluster already
runs, 1.5 s with the packages installed, 10-20 s from scratch with apt-get) and yields a
:class:`SlurmCluster`.
Without root, it uses a cluster somebody else started, or skips; when SLURM cannot be installed it
skips with the reason, unless ``GRADPROJ_SLURM_REQUIRED=1`` (CI), which turns the skip into an
error. ``GRADPROJ_SLURM_STOP_AFTER=1`` stops the cluster at the end of the session when this
session started it; by default it keeps running for the next session.

Finished jobs stay visible to ``scontrol``/``squeue`` only for a few seconds (``MinJobAge=4``, which
keeps ``sbatch --wait`` polling every 2 s); :meth:`SlurmCluster.job_state` falls back to the job
completion log (``JobCompType=jobcomp/filetxt``). ``sacct -c`` reads that log too, but mixes up
array tasks in 22.05.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "slurm_local.sh"

#: Job states after which a job never runs again.
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)
# For an array, job_state() reports the first of these that any task ended in.
_SEVERITY = (
    "FAILED",
    "OUT_OF_MEMORY",
    "TIMEOUT",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "CANCELLED",
    "COMPLETED",
)
_FIELD = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(\S*)")


def _fields(line: str) -> dict[str, str]:
    """Key=value pairs of one `scontrol show -o` or jobcomp line (values with spaces get cut)."""
    return {k: v for k, v in _FIELD.findall(line)}


def _record_key(rec: Mapping[str, str]) -> str:
    array_id, task = rec.get("ArrayJobId", ""), rec.get("ArrayTaskId", "")
    if array_id and array_id not in ("0", "(null)") and task and task not in ("N/A", "4294967294"):
        return f"{array_id}_{task}" if task.isdigit() else f"{array_id}_[{task}]"
    return rec.get("JobId", "")


def _base_state(state: str) -> str:
    return state.split()[0].rstrip("+") if state else ""


@dataclass
class SlurmCluster:
    """Handle on the running local cluster. All client calls get ``self.env`` (SLURM_CONF)."""

    state_dir: Path
    conf: Path
    node: str
    partition: str
    jobcomp_log: Path
    env: dict[str, str] = field(default_factory=dict)
    started_here: bool = False

    def environ(self, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
        """``base`` (default os.environ) plus the cluster's client variables plus ``extra``."""
        env = dict(os.environ if base is None else base)
        env.update(self.env)
        env.update(extra)
        return env

    def run(
        self, args: Sequence[str], *, timeout: float = 60, check: bool = False, **kw
    ) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (squeue, scontrol, scancel, sinfo, sacct -c, ...)."""
        kw.setdefault("env", self.environ())
        return subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, check=check, **kw
        )

    def submit(
        self,
        args: Sequence[str],
        cwd: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float | None = 900,
    ) -> tuple[str | None, subprocess.CompletedProcess[str]]:
        """``sbatch --parsable --export=ALL [--wait] *args`` in ``cwd``.

        ``env`` is the job's environment (default os.environ; SLURM_CONF is added). Returns the job
        id (a string, None when the submission was rejected) and the finished sbatch process: with
        ``wait=True`` its return code is the job's exit code, but 0 also for a job cancelled while
        pending, so check :meth:`job_state`.
        """
        cmd = ["sbatch", "--parsable", "--export=ALL"]
        if wait:
            cmd.append("--wait")
        cmd += [str(a) for a in args]
        cp = subprocess.run(
            cmd,
            cwd=cwd,
            env=self.environ(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        job_id = None
        for line in cp.stdout.splitlines():
            m = re.fullmatch(r"\s*(\d+)(?:;\S*)?\s*", line)
            if m:
                job_id = m.group(1)
                break
        return job_id, cp

    def _records_scontrol(self, job_id: str) -> list[dict[str, str]] | None:
        """Records of the job in slurmctld's memory; None when it does not know the job."""
        cp = self.run(["scontrol", "show", "job", "-o", str(job_id)], timeout=30)
        if cp.returncode != 0:
            if "Invalid job id" in cp.stderr:
                return None
            raise RuntimeError(f"scontrol show job {job_id} failed: {cp.stderr.strip()}")
        return [_fields(line) for line in cp.stdout.splitlines() if line.startswith("JobId=")]

    def _records_jobcomp(self, job_id: str) -> list[dict[str, str]]:
        """Records of finished jobs from the jobcomp log (the latest line per job wins)."""
        try:
            text = self.jobcomp_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        job_id = str(job_id)
        m = re.fullmatch(r"(\d+)_(\d+)", job_id)
        out: dict[str, dict[str, str]] = {}
        for line in text.splitlines():
            if job_id.split("_")[0] not in line:
                continue
            rec = _fields(line)
            if m:
                hit = rec.get("ArrayJobId") == m.group(1) and rec.get("ArrayTaskId") == m.group(2)
            else:  # a plain job, all tasks of an array, or an array task by its own JobId
                hit = job_id in (rec.get("ArrayJobId"), rec.get("JobId"))
            if hit:
                out[_record_key(rec)] = rec
        return list(out.values())

    def job_records(self, job_id: str | int) -> list[dict[str, str]]:
        """The job's records (one per array task): slurmctld's where it still has them, else the
        jobcomp log's (finished array tasks can be purged before the rest of the array ends)."""
        live = self._records_scontrol(str(job_id)) or []
        merged = {_record_key(r): r for r in self._records_jobcomp(str(job_id))}
        merged.update({_record_key(r): r for r in live})
        return list(merged.values())

    def job_states(self, job_id: str | int) -> dict[str, str]:
        """Current state per job / array task ("123", "123_4"; pending rest as "123_[5-9]")."""
        return {
            _record_key(r): _base_state(r.get("JobState", "")) for r in self.job_records(job_id)
        }

    def job_info(self, job_id: str | int, timeout: float = 120) -> dict[str, str]:
        """The fields of a single job (or array task) once it is final (waits up to ``timeout``)."""
        self.job_state(job_id, timeout=timeout)
        recs = self.job_records(job_id)
        if len(recs) != 1:
            raise LookupError(f"job {job_id}: expected one record, got {len(recs)}")
        return recs[0]

    def job_state(self, job_id: str | int, timeout: float = 120, poll: float = 0.25) -> str:
        """Final state of a job: COMPLETED, FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, ...

        Waits up to ``timeout`` seconds for the job to end (TimeoutError). For an array job
        ("123") it returns COMPLETED if every task completed, else the worst task state
        (see :meth:`job_states` for each task). A job id nobody knows raises LookupError.
        """
        deadline = time.monotonic() + timeout
        unknown_since = None
        states: dict[str, str] = {}
        while True:
            states = self.job_states(job_id)
            if states and all(s in FINAL_STATES for s in states.values()):
                # The controller has it final; jobcomp agrees or has not caught up: trust scontrol.
                for s in _SEVERITY:
                    if s in states.values():
                        return s
            now = time.monotonic()
            if not states:
                unknown_since = unknown_since or now
                if now - unknown_since > 10:
                    raise LookupError(f"SLURM does not know job {job_id}")
            else:
                unknown_since = None
            if now > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout} s: {states}")
            time.sleep(poll)

    def cancel(self, job_id: str | int) -> None:
        self.run(["scancel", str(job_id)], timeout=30)

    def queue(self) -> list[str]:
        """Job ids (``%i``) currently in the queue."""
        cp = self.run(["squeue", "-h", "-o", "%i"], timeout=30, check=True)
        return cp.stdout.split()


def _script_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin:" + env.get("PATH", "")
    return env


def _cluster_from_status(started_here: bool) -> SlurmCluster:
    env = _script_env()
    out = subprocess.run(
        ["bash", str(SCRIPT), "env"], capture_output=True, text=True, env=env, check=True
    ).stdout
    conf = Path(re.search(r"SLURM_CONF=(\S+)", out).group(1))
    state_dir = conf.parent.parent
    text = conf.read_text()
    node = re.search(r"^NodeName=(\S+)", text, re.M).group(1)
    partition = re.search(r"^PartitionName=(\S+)", text, re.M).group(1)
    jobcomp = Path(re.search(r"^JobCompLoc=(\S+)", text, re.M).group(1))
    return SlurmCluster(
        state_dir=state_dir,
        conf=conf,
        node=node,
        partition=partition,
        jobcomp_log=jobcomp,
        env={"SLURM_CONF": str(conf)},
        started_here=started_here,
    )


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("GRADPROJ_SLURM_REQUIRED") == "1":
        pytest.fail(f"GRADPROJ_SLURM_REQUIRED=1 but: {reason}", pytrace=False)
    pytest.skip(reason)


def ensure_cluster() -> SlurmCluster:
    """Start the local cluster if needed (root) or find a running one; skip when impossible."""
    env = _script_env()
    status = subprocess.run(
        ["bash", str(SCRIPT), "status"], capture_output=True, text=True, env=env, timeout=120
    )
    running = status.returncode == 0
    if os.geteuid() != 0:
        if running:
            return _cluster_from_status(started_here=False)
        _skip_or_fail(
            "no local SLURM cluster running and not root, so cannot start one "
            f"(run `sudo {SCRIPT} start`):\n{status.stdout}{status.stderr}"
        )
    have_pkgs = shutil.which("slurmctld", path=env["PATH"]) and shutil.which(
        "sbatch", path=env["PATH"]
    )
    if not have_pkgs and not shutil.which("apt-get", path=env["PATH"]):
        _skip_or_fail("SLURM is not installed and there is no apt-get to install it")
    # Always run start as root: idempotent, and it resumes a drained node (~0.3 s when running).
    t0 = time.monotonic()
    cp = subprocess.run(
        ["bash", str(SCRIPT), "start"], capture_output=True, text=True, env=env, timeout=900
    )
    if cp.returncode == 3:
        _skip_or_fail(f"SLURM cannot be installed here:\n{cp.stderr[-3000:]}")
    if cp.returncode != 0:
        pytest.fail(
            f"{SCRIPT} start failed (rc {cp.returncode}) after {time.monotonic() - t0:.1f} s:\n"
            f"{cp.stdout[-2000:]}{cp.stderr[-6000:]}",
            pytrace=False,
        )
    return _cluster_from_status(started_here=not running)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Session-wide local SLURM cluster; yields a :class:`SlurmCluster`."""
    cluster = ensure_cluster()
    yield cluster
    if cluster.started_here and os.environ.get("GRADPROJ_SLURM_STOP_AFTER") == "1":
        subprocess.run(["bash", str(SCRIPT), "stop"], env=_script_env(), timeout=300)
