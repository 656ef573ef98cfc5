"""Errors a user can cause: the CLI prints their one-sentence message and exits with status 2."""


class UserError(Exception):
    """Bad input from the user (file, config value, checkpoint...). The message is one sentence."""

    exit_code = 2
