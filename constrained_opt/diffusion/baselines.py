"""Deprecated alias of ``constrained_opt.diffusion.baselines``, kept for one release. Moved to:

- ``constrained_opt.diffusion.methods.registry``
- ``constrained_opt.diffusion.methods.base``
- ``constrained_opt.diffusion.methods.erasediff``
- ``constrained_opt.diffusion.methods.moo``
- ``constrained_opt.diffusion.methods.finetune``
- ``constrained_opt.diffusion.methods.neggrad``
- ``constrained_opt.diffusion.methods.salun``
- ``constrained_opt.diffusion.methods.sa``
- ``constrained_opt.diffusion.runtime.provenance``
- ``constrained_opt.diffusion.methods.unlearn``
"""

import warnings

from constrained_opt.diffusion.methods.base import Hyper, Method, Setup, check_forget_target  # noqa: F401
from constrained_opt.diffusion.methods.erasediff import (  # noqa: F401
    KKT_RULES,
    BilevelHyper,
    EraseDiff,
    EraseDiffPerClass,
    EraseDiffSharedAdam,
)
from constrained_opt.diffusion.methods.finetune import Finetune  # noqa: F401
from constrained_opt.diffusion.methods.moo import Moo, MooHyper  # noqa: F401
from constrained_opt.diffusion.methods.neggrad import NegGrad  # noqa: F401
from constrained_opt.diffusion.methods.registry import (  # noqa: F401
    BASELINES,
    METHODS,
    PUBLISHED,
    VARIANTS,
    make_method,
    method_class,
    parse_hparams,
)
from constrained_opt.diffusion.methods.sa import FISHER_INPUTS, SAHyper, SelectiveAmnesia, quantize_8bit  # noqa: F401
from constrained_opt.diffusion.methods.salun import SalUn, SalUnHyper  # noqa: F401
from constrained_opt.diffusion.methods.unlearn import UnlearnResult, unlearn  # noqa: F401
from constrained_opt.diffusion.runtime.provenance import model_digest  # noqa: F401

MOVED_TO = (
    "constrained_opt.diffusion.methods.registry",
    "constrained_opt.diffusion.methods.base",
    "constrained_opt.diffusion.methods.erasediff",
    "constrained_opt.diffusion.methods.moo",
    "constrained_opt.diffusion.methods.finetune",
    "constrained_opt.diffusion.methods.neggrad",
    "constrained_opt.diffusion.methods.salun",
    "constrained_opt.diffusion.methods.sa",
    "constrained_opt.diffusion.runtime.provenance",
    "constrained_opt.diffusion.methods.unlearn",
)

warnings.warn(
    f"{__name__} is deprecated; import from " + ", ".join(MOVED_TO),
    DeprecationWarning,
    stacklevel=2,
)
