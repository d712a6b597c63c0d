"""Compare projected influence scores with a reference: shim over `gradproj compare`."""

from gradproj.cli import compare_main as main
from gradproj.cli import compare_parse_args as parse_args
from gradproj.errors import run_cli

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    run_cli(main)
