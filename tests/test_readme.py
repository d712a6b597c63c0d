"""README.md stays a five-minute read that leads to the rest: at most 180 lines, a documentation
table that lists every docs/ page once, and relative links (of README.md and docs/*.md) that
reach a file."""

import re

from tests.conftest import REPO

README = REPO / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 180


def test_the_documentation_table_lists_every_docs_page_once():
    table = README.read_text().split("## Documentation", 1)[1]
    listed = re.findall(r"^\| \[docs/([\w.]+)\]", table, flags=re.M)
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert sorted(listed) == pages


def test_relative_links_reach_a_file():
    for page in [README, *sorted((REPO / "docs").glob("*.md"))]:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
        for target in LINK.findall(text):
            if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
                path = target.split("#", 1)[0]
                assert (page.parent / path).exists(), f"{page.name}: {target}"
