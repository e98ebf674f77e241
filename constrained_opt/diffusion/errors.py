"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class UsageError(Exception):
    """Bad user input (class out of range, unknown dataset, missing path, mismatched checkpoint)."""
