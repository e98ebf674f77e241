"""The core library as it was at another git revision, importable beside the current one, so a
benchmark can time old and new code in the same process and the same rounds (machine noise then hits
both alike).

``git archive REV constrained_opt`` is extracted into a temporary folder and imported under another
package name; the core's modules import each other relatively, so the old package uses only its own.
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def core_at(revision: str) -> ModuleType:
    """``constrained_opt`` at ``revision`` (any name git accepts), as a fresh package."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", revision], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", sha, "constrained_opt"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    folder = tempfile.mkdtemp(prefix=f"constrained_opt_{sha}_")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    name = f"constrained_opt_at_{sha}"
    init = os.path.join(folder, "constrained_opt", "__init__.py")
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[os.path.dirname(init)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    module.revision = sha
    return module
