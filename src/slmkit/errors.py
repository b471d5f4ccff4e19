"""Errors a user can cause.

Anything raised as :class:`UserError` is the user's to fix (a bad path, a bad config value, a corrupt
file, an empty corpus). The CLI prints its message on one line and exits with code 2, no traceback.
Everything else is a bug and may raise normally.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user caused and can fix; the message names the thing and the fix."""

    exit_code = 2


class MissingDependency(UserError):
    """An optional package a feature needs is not installed (or does not import); the message names the feature,
    the package and the exact pip command that installs it (see :mod:`slmkit.optional`)."""

    def __init__(self, message: str, *, module: str, install: str) -> None:
        super().__init__(message)
        self.module = module
        self.install = install
