"""The one error the explorer shows people."""


class ExplorerError(Exception):
    """A problem the user can fix (bad image, budget, model, ...), reported as one clear message."""
