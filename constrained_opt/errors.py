"""The exceptions the optimizer raises when it refuses a step or a setting.

All derive from :class:`OptimizerError`, itself a ``ValueError``, so a caller (the CLI, a training
script) can tell "the optimizer said no" from any other failure by type alone:

* :class:`ClosureError`: a closure returned something that cannot be differentiated or trusted;
* :class:`UpdateError`: the rule's coefficients or the update would write a non-finite value;
* :class:`SettingError`: a hyperparameter, a param group or the problem's shape is invalid.

In every case θ, the base optimizer's state and every ``p.grad`` are as they were before the call.
"""


class OptimizerError(ValueError):
    """The optimizer refused a step or a setting; nothing was changed."""


class ClosureError(OptimizerError):
    """A closure returned something the optimizer cannot differentiate or trust."""


class UpdateError(OptimizerError):
    """The rule produced a coefficient or an update that would write a non-finite value into θ or the
    base optimizer's state. Nothing was changed."""


class SettingError(OptimizerError):
    """A hyperparameter, a param group or the shape of the problem is invalid (the message names the
    value and the fix)."""
