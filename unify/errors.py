"""One exception type for every user-facing failure: the CLI prints its message on one line and exits 2."""


class BrownoutError(Exception):
    """A problem with the user's input (model, flags, files); its message is the whole explanation."""
