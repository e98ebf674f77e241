"""The exception types of the diffusion jobs: :class:`UsageError`, which the CLI turns into a one-line
message and exit status 2, and :class:`EvaluationError`, which marks one model's row as failed."""


class UsageError(Exception):
    """Bad user input (class out of range, unknown dataset, missing path, mismatched checkpoint)."""


class EvaluationError(Exception):
    """A model cannot be evaluated (its samples or their features are not finite); the report shows its
    row as failed with this reason and the other rows are still computed."""
