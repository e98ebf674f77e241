"""``step([f_1, f_2])`` under every multi-objective rule: two objectives are one constraint row plus the
retain row, the shape every other rule sees for one constraint (regression: UPGrad returned a [1]
weight there and the step failed)."""

import pytest
import torch
from torchjd.aggregation import UPGrad

from constrained_opt import ValueFunctionBilevelOptimizer


@pytest.mark.parametrize("rule", ["upgrad", "mgda", "pcgrad"])
def test_two_objectives_step(rule):
    torch.manual_seed(0)
    model, x = torch.nn.Linear(3, 1), torch.randn(8, 3)
    objectives = [lambda: (model(x) ** 2).mean(), lambda: -model(x).mean()]
    theta = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=1.0, rule=rule).step(objectives)
    delta = theta - torch.cat([p.detach().flatten() for p in model.parameters()])
    with torch.no_grad():
        for p, start in zip(model.parameters(), (0, 3), strict=True):  # back to θ for the Jacobian
            p.copy_(theta[start : start + p.numel()].view_as(p))
    jac = torch.stack(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(f(), list(model.parameters()))])
            for f in objectives
        ]
    )
    assert torch.isfinite(delta).all() and (jac @ delta >= -1e-6).all()  # non-conflicting
    if rule == "upgrad":
        torch.testing.assert_close(delta, UPGrad()(jac), rtol=1e-3, atol=1e-5)
