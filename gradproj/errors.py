"""User-facing errors: one line, exit code 2, never a traceback."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input the user can fix; the message names the problem and what to do."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a command's main, turning UserError into a one-line message and exit code 2."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
