"""The one exception type that means "the user's input is wrong" (printed without traceback)."""


class LesionLabError(Exception):
    """A user-facing error: bad data, bad option, missing artifact. CLIs print it on one line."""
