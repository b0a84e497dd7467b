"""The error type for bad user input: the CLI prints it as one line and exits non-zero."""


class UserError(Exception):
    """Input (config, command line, data, checkpoint) that cannot be used; the message says why and what is valid."""
