"""Exceptions the CLI prints as one line, without a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing dataset, damaged checkpoint). Never a bug. Exit status 2."""


class RunError(Exception):
    """The run cannot go on (training diverged, the disk is full); what was saved is intact. Exit status 1."""
