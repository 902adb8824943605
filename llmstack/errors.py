"""The base of every error caused by user input: the CLI prints its message (one line naming the
field, file or tensor) and exits with status 2, without a traceback unless --debug."""


class UserError(ValueError):
    pass
