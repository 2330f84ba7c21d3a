"""Errors the CLI turns into one clear line on stderr and exit code 2."""


class InputError(Exception):
    """Bad user input: a file, a flag or a value. The message names where and how to fix it."""

    exit_code = 2


class DiskFull(InputError):
    """The results folder's disk is full even for a cell's record: the run stops, in one line."""

    exit_code = 1
