"""Every fenced `bash` block of README.md and docs/*.md runs as written, in order, or says why not.

A block that cannot run here (a SLURM cluster, the Hugging Face hub, an install, placeholders)
carries the line `<!-- not run by tests: REASON -->` right above its fence; it is listed as a
skipped test with that reason. Every other block runs, the blocks of one page in order in one
scratch directory (a copy of the wrapper scripts and of examples/, the data cut to its first
rows so that the page's commands take seconds, not the demo's minutes), with `gradproj` and
`python` this checkout's. docs/architecture.md, "Tests", states this convention.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# at the start of its line: an indented one (docs/architecture.md's example) is not a marker
NOT_RUN = re.compile(r"^<!--\s*not run by tests:\s*(.*?)\s*-->$", re.MULTILINE)
FENCE = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
# The scratch copy of examples/data keeps this many rows per file.
ROWS = {"train.jsonl": 8, "test.jsonl": 4, "test_far.jsonl": 4}
# What a page's commands must leave behind, beyond exiting 0.
OUTPUTS = {
    "README.md": [
        *(f"scores/{v}/summary.json" for v in ("full", "rademacher_4096", "rademacher_32768")),
        "results/report.md",
    ],
}
WRAPPERS = ("extract_gradients.py", "score_influence.py", "compare_projections.py")


@dataclass
class Block:
    page: Path
    line: int
    code: str
    not_run: str | None  # the reason, when marked

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def bash_blocks(page: Path) -> list[Block]:
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.fullmatch(before)
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(page, line, match.group(1), marker.group(1) if marker else None))
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in bash_blocks(page)]
PAGES_TO_RUN = [p for p in PAGES if any(b.not_run is None for b in bash_blocks(p))]


def test_markers_are_well_formed_and_the_main_commands_run():
    """A marker names a reason and sits right above a block; README's commands are not marked."""
    for page in PAGES:
        text = page.read_text()
        marked = {b.line - 1 for b in bash_blocks(page) if b.not_run is not None}
        for match in NOT_RUN.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            assert match.group(1), f"{page.name}:{line}: a not-run marker without a reason"
            assert line in marked, f"{page.name}:{line}: a not-run marker not above a bash block"
    readme = [b for b in ALL_BLOCKS if b.page.name == "README.md" and b.not_run is None]
    assert any("gradproj compare" in b.code for b in readme)


@pytest.mark.parametrize(
    "block", [b for b in ALL_BLOCKS if b.not_run], ids=lambda b: b.name
)  # fmt: skip
def test_not_run_blocks_are_listed(block):
    pytest.skip(f"{block.name} not run: {block.not_run}")


def scratch_checkout(root: Path) -> Path:
    """Wrappers and examples/ in `root`, the data cut to ROWS; `gradproj`, `python` on PATH."""
    for name in WRAPPERS:
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "examples", root / "examples")
    for name, n in ROWS.items():
        path = root / "examples" / "data" / name
        rows = path.read_text().splitlines()[:n]
        path.write_text("\n".join(rows) + "\n")
    bin_dir = root / ".bin"
    bin_dir.mkdir()
    for command, call in (("gradproj", "-m gradproj"), ("python", "")):
        script = bin_dir / command
        script.write_text(f'#!/bin/sh\nexec {sys.executable} {call} "$@"\n')
        script.chmod(0o755)
    return bin_dir


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_TO_RUN, ids=lambda p: str(p.relative_to(REPO)))
def test_page_commands_run_as_written(page, tmp_path):
    bin_dir = scratch_checkout(tmp_path)
    env = os.environ | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
    }
    for block in bash_blocks(page):
        if block.not_run:
            continue
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, (
            f"{block.name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
            + proc.stderr[-3000:]
        )
    for written in OUTPUTS.get(page.name, ()):
        assert (tmp_path / written).is_file(), f"{page.name}'s commands did not write {written}"
