"""Write docs/cli.md from the parsers (tests/test_cli.py fails when it is out of date)."""

from pathlib import Path

from gradproj.cli import reference_markdown

if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
    target.write_text(reference_markdown())
    print(f"wrote {target}")
