"""The one error type users see: a single line naming the file, line or key at fault."""


class UserError(Exception):
    """Bad input from the user (a file, a config key, a flag). The CLI prints it as one line."""
