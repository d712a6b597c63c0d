"""User-facing errors: one line, exit code 2, never a traceback."""

import errno
import sys
import traceback
from collections.abc import Callable

# Where a bug is reported: the project has no public address of its own yet.
REPORT_TO = "the gradproj issue tracker"
# True of every command: an extraction keeps its finished shards, a scoring its previous output
NOTHING_PARTIAL = "nothing partial was kept; an extraction resumes from its finished shards"
# OS errors of the environment, not of gradproj: the user (or the cluster's admin) can fix them.
ENVIRONMENT_ERRNOS = {
    errno.EACCES: "permission denied; choose a directory you can write, or fix its permissions",
    errno.EPERM: "operation not permitted; choose a directory you can write",
    errno.EROFS: "read-only file system; choose a writable directory",
    errno.ENOSPC: "no space left on the device; free some space or choose another directory, "
    f"then rerun the same command ({NOTHING_PARTIAL})",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another directory, then rerun "
    f"the same command ({NOTHING_PARTIAL})",
    errno.EIO: "input/output error; check the disk or network file system",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EISDIR: "is a directory, not a file",
}


class UserError(Exception):
    """Bad input the user can fix; the message names the problem and what to do."""


class Terminated(BaseException):
    """A SIGTERM turned into an exception (where a command asks for it), so that it unwinds
    like Ctrl-C and removes what it was writing."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def check_unique_ids(ids: list[str], where: str, first_row: int = 0, most: int = 20) -> None:
    """Refuse duplicate example ids, naming each with its rows (the first `most`): ids are the
    join key of every later file (scores, top-k lists, metrics), where duplicates could not be
    told apart."""
    rows: dict[str, list[int]] = {}
    for position, example in enumerate(ids):
        rows.setdefault(example, []).append(first_row + position)
    duplicates = [(k, v) for k, v in rows.items() if len(v) > 1]
    if not duplicates:
        return
    named = "; ".join(f"{k!r} (rows {', '.join(map(str, v))})" for k, v in duplicates[:most])
    more = f" and {len(duplicates) - most} more" if len(duplicates) > most else ""
    raise UserError(
        f"{where} has {len(duplicates)} duplicate example id(s): {named}{more}; ids join every "
        "output (scores, top-k lists, metrics), so give each example its own id"
    )


def environment_message(err: OSError) -> str | None:
    """The one-line message for an OS error of the environment, or None for another error."""
    advice = ENVIRONMENT_ERRNOS.get(err.errno)
    if advice is None:
        return None
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{advice}"


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a command's main: UserError and environment errors give one line and exit code 2;
    anything else is a bug in gradproj, reported as one with its traceback, exit code 1."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated as err:
        print(f"stopped by signal {err.signum}; {NOTHING_PARTIAL}", file=sys.stderr)
        sys.exit(128 + err.signum)
    except OSError as err:
        message = environment_message(err)
        if message is None:
            _internal_error(err)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        _internal_error(err)
    sys.exit(code or 0)


def _internal_error(err: BaseException) -> None:
    traceback.print_exception(err, file=sys.stderr)
    print(
        f"internal error: {type(err).__name__}: {err}\nThis is a bug in gradproj, not a problem "
        f"of your input. Please report it to {REPORT_TO} with the command line and the "
        "traceback above.",
        file=sys.stderr,
    )
    sys.exit(1)
