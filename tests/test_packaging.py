"""`pip install` of gradproj: the wheel installs a working `gradproj` command, and the lock in
requirements.txt satisfies the ranges the package declares.

Offline and quick: the wheel is built from a copy of the sources with the project venv's
setuptools (no build isolation, so no download) and installed with --no-deps into an empty venv.
Its dependencies come from the project venv through a .pth line placed after the new venv's own
site-packages, so the `gradproj` imported is the installed one, not the checkout."""

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from gradproj import cli
from tests.conftest import REPO


def run(*argv, **kwargs) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_wheel_installs_the_gradproj_command(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    shutil.copytree(
        REPO / "gradproj", source / "gradproj", ignore=shutil.ignore_patterns("__pycache__")
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run(
        *pip,
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp_path / "dist"),
        str(source),
    )
    (wheel,) = (tmp_path / "dist").glob("gradproj-*.whl")
    page = {f"gradproj/analysis/page/explanations.{s}" for s in ("html", "css", "js")}
    assert page <= set(zipfile.ZipFile(wheel).namelist())  # package data: the explanation page

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    run(*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel))
    site = Path(
        run(str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    )
    (site / "zz_project_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")

    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    where = run(
        str(python), "-c", "import gradproj; print(gradproj.__file__)", env=env, cwd=tmp_path
    )
    assert Path(where.strip()).is_relative_to(site)
    command = str(venv / "bin" / "gradproj")
    assert "commands:" in run(command, "--help", env=env, cwd=tmp_path)
    for name in cli.COMMANDS:
        installed = run(command, name, "--help", env=env, cwd=tmp_path)
        assert installed == cli.COMMANDS[name].parser(f"gradproj {name}").format_help()


def test_the_lock_satisfies_the_declared_ranges():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    for requirements in project["optional-dependencies"].values():
        declared += [Requirement(r) for r in requirements if not r.startswith("gradproj")]
    lock = {}
    for line in (REPO / "requirements.txt").read_text().split():
        name, version = line.split("==")
        lock[name.lower()] = version
    for requirement in declared:
        assert requirement.name.lower() in lock, f"{requirement.name} is not in requirements.txt"
        assert requirement.specifier.contains(lock[requirement.name.lower()]), requirement
    assert project["scripts"]["gradproj"] == "gradproj.cli:entry_point"
