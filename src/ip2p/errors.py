"""The one exception type users see as a single line (the CLI prints it and exits with code 1)."""


class Ip2pError(Exception):
    """A problem with the user's input or setup, explained in one line: no stack trace is shown."""
