"""The one error the explorer shows people."""


class ExplorerError(Exception):
    """A problem the user can fix (bad image, budget, model, ...), reported as one clear message."""


def first_line(error: Exception) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for a short report."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
