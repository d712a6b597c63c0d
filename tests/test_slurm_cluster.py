"""Smoke tests of the local SLURM cluster fixture (tests/slurm_cluster.py)."""

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the lead moves this to conftest)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_batch_job_completes(slurm_cluster, tmp_path):  # noqa: F811
    job_id, cp = slurm_cluster.submit(["--wrap", "echo hi"], cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    assert job_id is not None, cp.stdout
    assert slurm_cluster.job_state(job_id) == "COMPLETED"
    assert (tmp_path / f"slurm-{job_id}.out").read_text().strip() == "hi"


def test_gpu_request_rejected_at_submission(slurm_cluster, tmp_path):  # noqa: F811
    job_id, cp = slurm_cluster.submit(["--gres=gpu:1", "--wrap", "true"], cwd=tmp_path)
    assert job_id is None, f"--gres=gpu:1 was accepted as job {job_id}"
    assert cp.returncode != 0
    assert "Invalid generic resource" in cp.stderr, cp.stderr
