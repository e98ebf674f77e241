"""constrained_opt: constrained multi-objective training as a drop-in torch.optim optimizer.

The core needs only torch and numpy; the diffusion applications live in
:mod:`constrained_opt.diffusion`, which imports diffusers lazily.
"""

from . import rules
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import ClosureError, OptimizerError, SettingError, UpdateError
from .functional import Gram, gram, kkt_direction, kkt_multiplier, kkt_solve
from .optimizer import ValueFunctionBilevelOptimizer
from .problem import Closures, MicroBatches
from .robust import Inversion, Relearn, Sharpness
from .rules import Combination, Geometry, Rule
from .stats import StepStats

__all__ = [
    "ClosureError",
    "Closures",
    "Combination",
    "Geometry",
    "Gram",
    "Inversion",
    "MicroBatches",
    "OptimizerError",
    "Relearn",
    "Rule",
    "SettingError",
    "Sharpness",
    "StepStats",
    "UpdateError",
    "ValueFunctionBilevelOptimizer",
    "gram",
    "kkt_direction",
    "kkt_multiplier",
    "kkt_solve",
    "load_checkpoint",
    "rules",
    "save_checkpoint",
]
__version__ = "0.1.0"
