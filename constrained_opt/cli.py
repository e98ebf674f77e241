"""The ``constrained-opt`` console script; the CLI itself is :mod:`constrained_opt.diffusion.cli`.

The other names this module held (``build_parser``, ...) still resolve for one release, with a
:class:`DeprecationWarning`.
"""

from __future__ import annotations

import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    from .diffusion.cli import main as run

    return run(argv)


def __getattr__(name: str):
    if name != "build_parser":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"{__name__}.{name} is deprecated; import it from constrained_opt.diffusion.cli",
        DeprecationWarning,
        stacklevel=2,
    )
    from .diffusion import cli

    return getattr(cli, name)


if __name__ == "__main__":
    sys.exit(main())
