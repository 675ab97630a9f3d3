"""The error hierarchy: every expected failure is an UpdateError whose message says what and why."""

from __future__ import annotations


class UpdateError(Exception):
    """Root of all errors this project reports to a user."""

    kind = "error"

    def context(self, what: str) -> UpdateError:
        """Return the same kind of error with context prepended: `Failed to extract x: <reason>`."""
        return type(self)(f"{what}: {self}")


class Rejected(UpdateError):
    """Found wrong before anything was written: the system is untouched."""

    kind = "rejected"


class Failed(UpdateError):
    """Went wrong after writing began: the install must be tried again."""

    kind = "failed"
