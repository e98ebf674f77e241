"""Deprecated alias of ``constrained_opt.diffusion.attacks_cli``, kept for one release (its ``register``
is now ``register(subparsers)`` in :mod:`constrained_opt.diffusion.cli.attack`). Moved to:

- ``constrained_opt.diffusion.cli.attack``
- ``constrained_opt.diffusion.cli.budgets``
"""

import warnings

from constrained_opt.diffusion.cli.attack import DDPM_HELP  # noqa: F401
from constrained_opt.diffusion.cli.budgets import (  # noqa: F401
    NON_NEGATIVE_FIELDS,
    add_budget_flags,
    budget_from,
    flag_type,
)

MOVED_TO = ("constrained_opt.diffusion.cli.attack", "constrained_opt.diffusion.cli.budgets")

warnings.warn(
    f"{__name__} is deprecated; import from " + ", ".join(MOVED_TO),
    DeprecationWarning,
    stacklevel=2,
)
