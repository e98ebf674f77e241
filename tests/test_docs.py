"""docs/api.md's python blocks run as written, in one namespace that defines only the names the page
leaves open (a model, its parameters, closures over one fixed batch, a checkpoint path)."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

API = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def _blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def _namespace(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(8, 4)  # one batch, read by every call of every closure
    return {
        "torch": torch,
        "model": model,
        "params": list(model.parameters()),
        "retain_closure": lambda: model(x).pow(2).mean(),
        "forget_closure": lambda: (model(x)[:, 0] - 1).pow(2).mean(),
        "f1": lambda: (model(x)[:, 0] - 1).pow(2).mean(),
        "f2": lambda: (model(x)[:, 1] + 1).pow(2).mean(),
        "f3": lambda: (model(x)[:, 2] - 2).pow(2).mean(),
        "path": tmp_path / "run.safetensors",
    }


def test_api_md_has_python_blocks():
    assert len(_blocks(API)) >= 4


@pytest.mark.parametrize("index", range(len(_blocks(API))))
def test_api_md_python_block_runs(index, tmp_path):
    namespace = _namespace(tmp_path)
    blocks = _blocks(API)
    for block in blocks[:index]:  # earlier blocks define what later ones use (opt, ...)
        exec(compile(block, f"{API}:block{blocks.index(block)}", "exec"), namespace)
    exec(compile(blocks[index], f"{API}:block{index}", "exec"), namespace)
