"""One step enters each of its stages once, in the order of the algorithm (docs/architecture.md)."""

import os
import sys

import pytest
import torch

import constrained_opt
from constrained_opt import ValueFunctionBilevelOptimizer

STAGES = [
    ("problem", "parse_step_arguments"),
    ("gradients", "take_gradients"),
    ("gradients", "loss_values"),
    ("projection", "solve"),
    ("stats", "read"),
    ("stats", "build_stats"),
    ("projection", "apply"),
    ("transaction", "commit"),
]


def traced_step(opt, *closures):
    """The (module, function) of every call into the library during one step, in order."""
    root = os.path.dirname(constrained_opt.__file__)
    calls = []

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_filename.startswith(root) and not code.co_name.startswith("<"):
            calls.append((os.path.basename(code.co_filename)[:-3], code.co_name))

    sys.setprofile(profile)
    try:
        opt.step(*closures)
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("inner_steps", [0, 1, 3])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_a_step_enters_each_stage_once_in_order(inner_steps, max_grad_norm):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x = torch.randn(8, 4)
    opt = ValueFunctionBilevelOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.1, inner_steps=inner_steps, max_grad_norm=max_grad_norm
    )
    calls = traced_step(opt, lambda: model(x).pow(2).mean(), lambda: model(x).sum())
    stages = [c for c in calls if c in STAGES]
    assert stages == STAGES
    assert calls.count(("gradients", "backward")) == 1 + max(inner_steps - 1, 0) + 1  # rows and inner passes
    assert calls.count(("validation", "check_measured")) == calls.count(("validation", "check_update")) == 1


def test_an_out_of_range_gram_is_projected_again_in_fp64_once():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x = torch.randn(8, 4)
    opt = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=0.0, inner_steps=0)
    # a squared norm of 1e-36 leaves the range where fp32 squares keep their precision
    calls = traced_step(opt, lambda: model(x).pow(2).mean(), lambda: 1e-18 * model(x).sum())
    assert calls.count(("projection", "solve")) == calls.count(("stats", "read")) == 2
    x64 = x.double()
    exact = 1e-18 * float(torch.sqrt(2 * x64.sum(0).pow(2).sum() + 2 * len(x) ** 2))  # ‖∇(1e-18·Σ Wx + b)‖
    assert opt.last_stats.forget_grad_norm == pytest.approx(exact, rel=1e-5)
