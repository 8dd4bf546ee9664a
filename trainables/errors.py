"""One root exception for problems in the user's input.

Command-line entry points catch :class:`SegHPOError` and turn it into a single line on
stderr plus exit code 2 (see :func:`trainables.cli.exit_on_user_error`).
"""
from __future__ import annotations


class SegHPOError(Exception):
    """Base class of every error caused by user input (files, configuration, spaces)."""


class InputError(SegHPOError):
    """A problem with one file the user gave us.

    ``str(err)`` is ``"<file>: <problem>"`` so the CLI can print it as the one line.
    """

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(SegHPOError):
    """A bad configuration value: names the source (file or flag), the key and the problem."""

    def __init__(self, source, key: str, problem: str):
        self.source = str(source)
        self.key = key
        self.problem = problem
        super().__init__(f"{self.source}: {key}: {problem}")
