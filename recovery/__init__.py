"""Single-copy recovery updater: the shared library, the recovery init and reflashctl."""

__version__ = "0.1.0"
