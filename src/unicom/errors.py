"""Errors that describe a problem with the user's input (files, rows, keys, options).

The command line prints them without a traceback; the library raises them so that a
caller can tell a bad input from a bug.
"""


class InputError(ValueError):
    """Bad input: the message says what is wrong, where (file, row, key) and what to do."""


class FolderError(InputError):
    """A folder that a program was given and reads on its own (the index a server serves) is
    missing a file, or holds a damaged or changed one. Bad input for the command that was
    given the folder; for a client of the server, a failure of the server (HTTP 500)."""
