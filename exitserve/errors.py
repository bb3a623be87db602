"""The project's own errors: what a user can cause and fix (a missing file, a bad option, a
model the repository lacks), told apart from bugs.

The ``exitserve`` command prints such an error's message alone and exits 2; any other
exception is a bug and keeps its traceback. Subclasses keep a builtin base too
(``ValueError``, ``KeyError``, ...) where callers already catch that.
"""

from __future__ import annotations


class ExitserveError(Exception):
    """Base of every error a user can fix from its message."""


class ConfigurationError(ExitserveError, ValueError):
    """Settings or options that cannot be used, alone or together."""
