"""bench/gpu_all.sh cannot rot: its dry run runs every step on the CPU at toy sizes and writes
the table the GPU run writes, and `gradproj plan --calibration` reads that table."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from gradproj import cli
from gradproj.plan import PlanConfig, plan, read_results_table

REPO = Path(__file__).resolve().parent.parent
STEPS = ["environment", "setup", "model", "cuda_tests", "matmul", "extract_calibration",
         "extract_bf16", "extract_fp32", "scoring", "projection"]  # fmt: skip
OUTPUTS = {"gpu_results.md", "environment.txt", "raw.log", "steps.tsv", "results.json", "DRY_RUN"}


def gpu_all(tmp_path, **env) -> Path:
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", "bench/gpu_all.sh", "--dry-run", str(out), str(tmp_path / "work")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2", **env},
    )
    assert proc.returncode == 0, proc.stderr
    return out


def statuses(out: Path) -> dict[str, str]:
    lines = (out / "steps.tsv").read_text().splitlines()
    return {line.split("\t")[0]: line.split("\t")[1] for line in lines}


@pytest.mark.slow
def test_dry_run_measures_every_step_and_plan_reads_its_table(tmp_path, capsys):
    out = gpu_all(tmp_path)
    assert {p.name for p in out.iterdir()} == OUTPUTS  # few files: all come back from a device
    assert statuses(out) == dict.fromkeys(STEPS, "ok"), (out / "raw.log").read_text()[-3000:]
    rows = read_results_table(out / "gpu_results.md")
    assert {r["step"] for r in rows} >= set(STEPS) - {"setup"} | {"calibration"}
    assert not [r for r in rows if r["value"] == "?"], "a step's figure is missing"
    calibration = {r["quantity"]: float(r["value"]) for r in rows if r["step"] == "calibration"}
    assert calibration.keys() == {"gradient", "rademacher", "normal", "sjlt", "kronecker"}
    assert all(v > 0 for v in calibration.values())

    table = out / "gpu_results.md"
    cfg = dict(hidden_size=64, layers=2, params=4e6, n_examples=10, mean_tokens=50, gpu="cpu")
    rates = plan(PlanConfig(**cfg, proj_type="sjlt", calibration=table))["rates"]
    assert rates["gradient"].value == calibration["gradient"]
    assert rates["sjlt"].value == calibration["sjlt"]
    argv = ["plan", "--hidden_size", "64", "--layers", "2", "--params", "4e6", "--n_examples",
            "10", "--mean_tokens", "50", "--gpu", "cpu", "--calibration", str(table)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"gradient: {calibration['gradient'] / 1e12:,.2f} TFLOP/s (measured: {table}" in printed
    assert f"rademacher: {calibration['rademacher'] / 1e12:,.2f} TFLOP/s (measured: " in printed


def test_steps_past_the_budget_are_recorded_and_the_table_is_still_written(tmp_path):
    """A step that cannot run is a row of the table, and the steps after it still get theirs."""
    out = gpu_all(tmp_path, GPU_ALL_BUDGET="0")
    assert statuses(out) == dict.fromkeys(STEPS, "skipped (budget)")
    rows = read_results_table(out / "gpu_results.md")
    assert {r["status"] for r in rows if r["step"] != "calibration"} == {"skipped (budget)"}


def test_every_gpu_test_file_is_in_the_scripts_list():
    script = (REPO / "bench" / "gpu_all.sh").read_text()
    (listed,) = re.findall(r"^GPU_TESTS=\((.*)\)$", script, flags=re.M)
    marked = {
        f"tests/{p.name}"
        for p in (REPO / "tests").glob("test_*.py")
        if "pytest.mark.gpu" in p.read_text() and p.name != "test_gpu_check.py"
    }
    assert set(listed.split()) == marked
