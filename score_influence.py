#!/usr/bin/env python
"""Score every train example against every test example: shim over `gradproj score`."""

from gradproj.cli import score_main as main
from gradproj.cli import score_parse_args as parse_args
from gradproj.errors import run_cli

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    run_cli(main)
