"""One family of exceptions for the whole package.

`LatentcacheError` is the base of every error we raise on purpose. `UserError` is the subset a
user can fix (a wrong flag, a missing model, an output made differently): the CLI prints it as
one line and exits 2. Anything else, ours or a library's, is a bug and keeps its traceback.
"""

from __future__ import annotations


class LatentcacheError(Exception):
    """Base of every error latentcache raises on purpose."""


class UserError(LatentcacheError):
    """Something the user can fix: the CLI prints the message as one line and exits 2."""
