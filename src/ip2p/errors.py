"""The one exception type users see as a single line (the CLI prints it and exits with code 1)."""


class Ip2pError(Exception):
    """A problem with the user's input or setup, explained in one line: no stack trace is shown."""


# Operating-system failures that are the machine's state, not a bug: reported as one line naming the path.
_SYSTEM_STATE = {28: "no space left on device", 122: "disk quota exceeded", 30: "read-only file system",
                 13: "permission denied", 24: "too many open files", 27: "file too large"}


def system_error_line(err: BaseException) -> str | None:
    """One line for an OSError caused by the machine's state (a full disk, a quota, permissions), naming
    the file; None for anything else (a real bug keeps its traceback)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _SYSTEM_STATE:
            where = err.filename or err.filename2
            return _SYSTEM_STATE[err.errno] + (f" while writing '{where}'" if where else "")
        err = err.__cause__ or err.__context__
    return None


def one_line(err: BaseException) -> str | None:
    """What the CLI prints for an error: ours as is, the machine's state (system_error_line) named;
    None for anything else, which keeps its traceback."""
    return str(err) if isinstance(err, Ip2pError) else system_error_line(err)


def sqlite_full(err: BaseException, path) -> BaseException:
    """SQLite's 'database or disk is full' as the OSError of a full disk naming its file (what the CLI
    reports in one line; raise it `from err`); any other error is returned as it is."""
    import errno
    import os
    import sqlite3

    if isinstance(err, sqlite3.OperationalError) and "full" in str(err):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return err
