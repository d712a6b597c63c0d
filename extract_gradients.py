#!/usr/bin/env python
"""Extract per-example loss gradients (full or randomly projected): shim over `gradproj extract`."""

from gradproj.cli import extract_main as main
from gradproj.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
