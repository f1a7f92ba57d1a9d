"""The one exception type for mistakes a user can fix (config, command line, data path, checkpoint)."""


class UserError(Exception):
    """A problem in the user's input. The CLI prints it as one line and exits with status 2.

    `same_on_every_rank`: every rank raises this very error (the config they all read, a verdict
    rank 0 broadcast), so one line per node says it; the other local ranks exit quietly.
    """

    same_on_every_rank = False


def on_every_rank(err: UserError) -> UserError:
    err.same_on_every_rank = True
    return err
