"""The one base of every error whose message is written for the user: the CLI prints it, never a traceback."""


class UserError(Exception):
    """Bad input, a missing file or setting, a model that cannot be used: the message says what to do."""
