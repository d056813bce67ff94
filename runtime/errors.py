"""One exception type for every user-facing failure; the `unify` CLI prints its message on one line and exits 2.

It subclasses ValueError: nearly every failure is a bad value handed in (a ratio, a policy, a path, a checkpoint that
does not fit the model), so `except ValueError` works as Python users expect.
"""


class BrownoutError(ValueError):
    """A problem with the user's input (model, flags, files, values); its message is the whole explanation."""
