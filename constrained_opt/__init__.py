"""constrained_opt: constrained two-objective training as a drop-in torch.optim optimizer.

The core needs only torch and numpy; the diffusion applications live in
:mod:`constrained_opt.diffusion`, which imports diffusers lazily.
"""

from . import rules
from .checkpoint import load_checkpoint, save_checkpoint
from .functional import Gram, gram, kkt_direction, kkt_multiplier
from .optimizer import ClosureError, StepStats, ValueFunctionBilevelOptimizer
from .rules import Combination, Geometry, Rule

__all__ = [
    "ClosureError",
    "Combination",
    "Geometry",
    "Gram",
    "Rule",
    "StepStats",
    "ValueFunctionBilevelOptimizer",
    "gram",
    "kkt_direction",
    "kkt_multiplier",
    "load_checkpoint",
    "rules",
    "save_checkpoint",
]
__version__ = "0.1.0"
