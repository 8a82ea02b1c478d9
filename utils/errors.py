"""Errors that mean "the user's input is wrong": scripts print them as one line and exit 2."""


class InputError(Exception):
    """Bad user input (missing/corrupt file, wrong format, out-of-range option).

    The message must say what is wrong and what to do; scripts print it on one line and exit with code 2.
    """
