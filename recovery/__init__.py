"""Single-copy recovery updater: the shared library, the recovery init and updatectl."""

__version__ = "0.1.0"
