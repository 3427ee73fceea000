"""The model errors (a user can fix them: the CLI prints one line)."""

from __future__ import annotations

from ..errors import UserError


class ModelError(UserError):
    """The model cannot be found, loaded or used; the message says why."""
