"""`python -m gradproj COMMAND ...`: the same as the `gradproj` command."""

from gradproj.cli import entry_point

entry_point()
