"""Compare projected influence scores with a reference: shim over `gradproj compare`."""

from gradproj.cli import compare_main as main
from gradproj.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
