"""Errors that describe a problem with the user's input (files, rows, keys, options).

The command line prints them without a traceback; the library raises them so that a
caller can tell a bad input from a bug.
"""


class InputError(ValueError):
    """Bad input: the message says what is wrong, where (file, row, key) and what to do."""
