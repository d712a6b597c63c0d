#!/usr/bin/env python
"""Score every train example against every test example: shim over `gradproj score`."""

from gradproj.cli import score_main as main
from gradproj.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
