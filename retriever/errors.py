"""Errors a user can act on.

Library code raises `UserError` (or a subclass) for problems the person running retriever can fix:
a missing path, an empty source, a model that does not match an index. The CLI prints its message as
one sentence and exits with status 1; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one sentence."""


class ModelLoadError(UserError):
    """A model could not be built or its weights could not be loaded."""


class ModelMismatchError(UserError):
    """Vectors produced by one model were about to be compared with another model's."""
