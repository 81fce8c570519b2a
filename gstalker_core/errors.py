"""User-facing errors: each names the problem and the fix.

The CLI prints these without a traceback; anything else escaping is a bug.
"""

from __future__ import annotations


class GstalkerError(Exception):
    """Base of every error meant for the user."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem}\n  fix: {self.fix}"

    def __reduce__(self):  # keep problem/fix across pickling (Prefect results, workers)
        return (type(self), (self.problem, self.fix))


class ConfigError(GstalkerError):
    """A config file, override or environment variable is invalid."""


class InputError(GstalkerError):
    """A user-supplied input (media file, name, job file) is unusable."""


class StorageError(GstalkerError):
    """The artifact store is unreachable, refuses us, or holds corrupt data."""
