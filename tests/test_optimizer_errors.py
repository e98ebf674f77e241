"""Bad closures raise a clear error naming the closure, and leave θ, optimizer state and .grad intact."""

import copy

import pytest
import torch
from torch import nn

from constrained_opt import ClosureError, ValueFunctionBilevelOptimizer


class Setup:
    def __init__(self, inner_steps=3):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
        self.x = torch.randn(8, 3)
        self.opt = ValueFunctionBilevelOptimizer(
            self.model.parameters(), torch.optim.Adam, lr=1e-2, inner_steps=inner_steps, inner_lr=0.1
        )
        self.forget_calls = 0
        self.opt.step(self.retain, self.forget)  # Adam now has state worth protecting
        self.sentinels = [torch.randn_like(p) for p in self.model.parameters()]
        for p, s in zip(self.model.parameters(), self.sentinels, strict=True):
            p.grad = s
        self.sentinel_values = [s.clone() for s in self.sentinels]
        self.params = [p.detach().clone() for p in self.model.parameters()]
        self.state = copy.deepcopy(self.opt.state_dict())

    def retain(self):
        return self.model(self.x).pow(2).mean()

    def forget(self):
        self.forget_calls += 1
        return (self.model(self.x) - 1).pow(2).mean()

    def assert_untouched(self):
        for p, before in zip(self.model.parameters(), self.params, strict=True):
            assert torch.equal(p, before)
        for p, s, v in zip(self.model.parameters(), self.sentinels, self.sentinel_values, strict=True):
            assert p.grad is s and torch.equal(s, v)
        state = self.opt.state_dict()
        assert state["bilevel"] == self.state["bilevel"]
        assert state["param_groups"] == self.state["param_groups"]
        for k, v in self.state["state"].items():
            for name, t in v.items():
                assert torch.equal(torch.as_tensor(state["state"][k][name]), torch.as_tensor(t)), name


def at_call(s, n, bad):
    """A forget closure that behaves until its n-th call (1-based), then returns ``bad(s)``."""

    def forget():
        s.forget_calls += 1
        if s.forget_calls == n:
            return bad(s)
        return (s.model(s.x) - 1).pow(2).mean()

    return forget


BAD_FORGET = {
    "float": (lambda s: 1.0, "forget_closure returned float at θ"),
    "tuple": (lambda s: (s.model(s.x).mean(), 1), "forget_closure returned tuple"),
    "non-scalar": (lambda s: s.model(s.x), r"shape \(8, 1\)"),
    "integer": (lambda s: torch.tensor(3), "torch.int64"),
    "detached": (lambda s: s.model(s.x).mean().detach(), "no autograd graph"),
    "unrelated graph": (
        lambda s: (torch.ones(2, requires_grad=True) * 2).sum(),
        "does not depend on any parameter",
    ),
    "nan": (lambda s: s.model(s.x).mean() * float("nan"), r"non-finite loss \(nan\) at θ"),
    "inf": (lambda s: s.model(s.x).mean() + float("inf"), r"non-finite loss \(inf\) at θ"),
    "nan gradient": (lambda s: torch.sqrt(s.model(s.x).sum() * 0), "gradient of forget_closure"),
}


@pytest.mark.parametrize("case", sorted(BAD_FORGET))
def test_bad_forget_closure_at_theta(case):
    s = Setup()
    bad, match = BAD_FORGET[case]
    with pytest.raises(ClosureError, match=match):
        s.opt.step(s.retain, at_call(s, s.forget_calls + 1, bad))
    s.assert_untouched()


@pytest.mark.parametrize(("call", "where"), [(2, "φ\\^1"), (3, "φ\\^2"), (4, "φ\\^3")])
def test_non_finite_inside_the_inner_loop(call, where):
    s = Setup(inner_steps=3)
    start = s.forget_calls
    with pytest.raises(ClosureError, match=f"non-finite loss \\(inf\\) at inner step {where}"):
        s.opt.step(s.retain, at_call(s, start + call, lambda s: s.model(s.x).mean() + float("inf")))
    s.assert_untouched()


@pytest.mark.parametrize("exc", [RuntimeError("data loader died"), KeyboardInterrupt()])
def test_exception_inside_the_inner_loop_restores_theta(exc):
    s = Setup(inner_steps=3)
    start = s.forget_calls

    def raiser(s):
        raise exc

    with pytest.raises(type(exc)):
        s.opt.step(s.retain, at_call(s, start + 3, raiser))
    s.assert_untouched()


BAD_RETAIN = {
    "none": (lambda s: None, "retain_closure returned NoneType"),
    "nan": (lambda s: s.model(s.x).mean() * float("nan"), "retain_closure returned a non-finite loss"),
    "nan gradient": (lambda s: torch.sqrt(s.model(s.x).sum() * 0), "gradient of retain_closure"),
    "detached": (lambda s: s.model(s.x).mean().detach(), "retain_closure returned a tensor with no autograd"),
}


@pytest.mark.parametrize("case", sorted(BAD_RETAIN))
def test_bad_retain_closure(case):
    s = Setup(inner_steps=2)
    bad, match = BAD_RETAIN[case]
    with pytest.raises(ClosureError, match=match):
        s.opt.step(lambda: bad(s), s.forget)
    s.assert_untouched()


def test_non_callable_closure():
    s = Setup()
    with pytest.raises(TypeError, match="retain_closure must be a callable"):
        s.opt.step(s.model(s.x).mean(), s.forget)
    s.assert_untouched()
