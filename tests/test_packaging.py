"""The core imports only torch and numpy; the applications load their stack lazily."""

import subprocess
import sys

HEAVY = ("diffusers", "transformers", "torchvision", "sklearn", "safetensors", "matplotlib", "accelerate")


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_core_needs_only_torch_and_numpy():
    assert not imported_after("import constrained_opt") & set(HEAVY)


def test_cli_parser_loads_no_diffusion_stack():
    assert not imported_after("from constrained_opt.diffusion import cli; cli.build_parser()") & set(HEAVY)
