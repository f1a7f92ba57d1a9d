"""The one exception type for mistakes a user can fix (config, command line, data path, checkpoint)."""


class UserError(Exception):
    """A problem in the user's input. The CLI prints it as one line and exits with status 2."""
