"""The one exception type for user mistakes: the CLI prints it as one line and exits with status 2."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing dataset, damaged checkpoint). Never a bug."""
