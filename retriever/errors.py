"""Errors a user can act on.

Library code raises `UserError` (or a subclass) for problems the person running retriever can fix:
a missing path, an empty source, a model that does not match an index. The CLI prints its message as
one sentence and exits with status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input, explained in one sentence."""


class ModelLoadError(UserError):
    """A model could not be built or its weights could not be loaded."""


class ModelMismatchError(UserError):
    """Vectors produced by one model were about to be compared with another model's."""


class ConfigError(UserError):
    """A bad argument to a library call; the message names the parameter (`batch_size`).

    `params` lists the parameter names the message uses, so that a front end can say them its own
    way: the CLI prints `--batch-size` (see `renamed`).
    """

    def __init__(self, message: str, *params: str):
        super().__init__(message)
        self.params = params

    def renamed(self, name: Callable[[str], str]) -> str:
        """The message with each parameter name replaced by `name(param)`."""
        text = str(self)
        for p in sorted(self.params, key=len, reverse=True):
            text = re.sub(rf"(?<![\w-]){re.escape(p)}(?![\w-])", name(p), text)
        return text
