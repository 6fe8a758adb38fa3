"""One exception type for anything the user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input, config or environment: shown as `error: <message>`, exit code 2."""


class Interrupted(UserError):
    """Ctrl-C: the run stopped cleanly after the current batch; exit code 130."""
