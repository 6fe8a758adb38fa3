"""The errors a user sees: one line on stderr each, and an exit code per kind (README: Exit codes).

    2    bad input, config, card, environment; a run directory in use by another run
    3    out of memory while loading or generating
    4    a server answered 200 with a body that is not a completion
    130  Ctrl-C: stopped after the current batch
    131  a second Ctrl-C: stopped at once (the batch in progress is generated again on resume)
    132  Ctrl-C while the run was being opened (before any stage)
"""


class UserError(Exception):
    """Bad input, config or environment: shown as `error: <message>`."""
    exit_code = 2
    label = "error"


class OutOfMemory(UserError):
    """A model did not fit while loading or generating; the message names the card and what to lower."""
    exit_code = 3


class BadResponse(UserError):
    """A server answered 200 with something that is not a completion (not JSON, no `choices`)."""
    exit_code = 4


class Interrupted(UserError):
    """Ctrl-C: the run stopped cleanly after the current batch."""
    exit_code = 130
    label = "interrupted"


class StoppedAtOnce(Interrupted):
    exit_code = 131


class InterruptedWhileOpening(Interrupted):
    exit_code = 132


class StopNow(BaseException):
    """Raised by the second Ctrl-C. Not an Exception, so that no library's `except Exception`
    swallows it on its way out of a generate call; not a KeyboardInterrupt, which the command-line
    framework would turn into its own "Aborted!"."""
