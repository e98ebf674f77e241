"""Item 8 (cooper): one constrained problem, solved by cooper's Lagrangian method and by ours.

Problem (fairness with one constraint per group): predict whether a patient's diabetes progression
after one year is above the median from scikit-learn's bundled diabetes data (442 patients, 50/50
split, logistic regression), with demographic parity for each age quartile k (quartiles of the
training split): with p̄_k the mean predicted P(y = 1) of group k and p̄ that of everyone,

    min_θ BCE(θ)   s.t.   c_k(θ) = (p̄_k − p̄)² − ε² ≤ 0,   k = 1..4,   ε = 0.05.

cooper (``cooper-optim``, its README's quick start): a ``ConstrainedMinimizationProblem`` with one
``Constraint`` (``DenseMultiplier`` over the 4 constraints, Lagrangian formulation, multipliers from
0), ``SimultaneousOptimizer``, the dual optimizer ``SGD(lr, maximize=True)`` with the README's
lr = 1e-2 and a sweep over {1e-3, 1e-1, 1}. Ours: ``opt.step(bce, {"q1": c₁⁺, ..., "q4": c₄⁺})``
with c_k⁺ = max(0, c_k) (a loss whose minimum, 0, is reached exactly on the feasible set, so the
value-function constraint c_k⁺ − min c_k⁺ ≤ 0 is the same constraint), rule ``grad_norm`` at its
default η = 1, K = 0. Both: full-batch Adam at the same lr on the same initial weights.

One of our steps makes m + 1 = 5 forward/backward passes (one per constraint, one for BCE); one of
cooper's makes one (the Lagrangian). So cooper gets 5× the steps: the curves are drawn against
forward passes, and the table reads both methods at the same pass budget. Several random splits
give each figure a spread; the violation is max_k (|p̄_k − p̄| − ε)₊ on the training set (the quantity
constrained) and on the held-out half.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

EPS = 0.05
LR = 1e-2
DEFAULT_DUAL_LR = 1e-2  # cooper's README quick start
DUAL_LRS = (1e-3, 1e-2, 1e-1, 1.0)


class Split:
    """Standardised features, binary targets and age-quartile groups of one random 50/50 split."""

    def __init__(self, seed: int) -> None:
        from sklearn.datasets import load_diabetes

        data = load_diabetes()
        x, target = data.data, data.target
        order = np.random.default_rng(seed).permutation(len(target))
        train, test = order[: len(order) // 2], order[len(order) // 2 :]
        mean, std = x[train].mean(0), x[train].std(0)
        edges = np.quantile(x[train, 0], [0.25, 0.5, 0.75])
        groups = torch.tensor(np.searchsorted(edges, x[:, 0], side="right"))
        xs = torch.tensor((x - mean) / std, dtype=torch.float32)
        ys = torch.tensor(target > np.median(target[train]), dtype=torch.float32)
        self.parts = {name: (xs[i], ys[i], groups[i]) for name, i in (("train", train), ("test", test))}
        self.num_groups = 4


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(10, 1)


def bce(model, x, y, groups) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)


def gaps(model, x, y, groups) -> torch.Tensor:
    """p̄_k − p̄ for every group k."""
    p = torch.sigmoid(model(x).squeeze(-1))
    return torch.stack([p[groups == k].mean() for k in range(4)]) - p.mean()


def measure(model, split: Split) -> dict[str, float]:
    out = {}
    with torch.no_grad():
        for name, part in split.parts.items():
            x, y, _ = part
            out[f"{name}_bce"] = bce(model, *part).item()
            out[f"{name}_acc"] = ((model(x).squeeze(-1) > 0).float() == y).float().mean().item()
            out[f"{name}_violation"] = torch.clamp_min(gaps(model, *part).abs() - EPS, 0).max().item()
    return out


def run_ours(split: Split, seed: int, steps: int, every: int) -> dict:
    from constrained_opt import ValueFunctionBilevelOptimizer

    model = make_model(seed)
    opt = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.Adam, lr=LR, inner_steps=0)
    train = split.parts["train"]

    def constraint(k: int):
        return lambda: torch.clamp_min(gaps(model, *train)[k] ** 2 - EPS**2, 0)

    constraints = {f"q{k + 1}": constraint(k) for k in range(split.num_groups)}
    passes_per_step = split.num_groups + 1
    curve, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        opt.step(lambda: bce(model, *train), constraints)
        if step % every == 0:
            curve.append({"step": step, "passes": step * passes_per_step, **measure(model, split)})
    return {"curve": curve, "seconds": time.perf_counter() - start, "passes_per_step": passes_per_step}


def run_cooper(split: Split, seed: int, steps: int, every: int, dual_lr: float) -> dict:
    import cooper

    model = make_model(seed)
    train = split.parts["train"]

    class FairnessCMP(cooper.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            multiplier = cooper.multipliers.DenseMultiplier(num_constraints=split.num_groups)
            self.constraint = cooper.Constraint(
                multiplier=multiplier, constraint_type=cooper.ConstraintType.INEQUALITY
            )

        def compute_cmp_state(self):
            violation = gaps(model, *train) ** 2 - EPS**2
            state = cooper.ConstraintState(violation=violation)
            return cooper.CMPState(loss=bce(model, *train), observed_constraints={self.constraint: state})

    cmp = FairnessCMP()
    primal = torch.optim.Adam(model.parameters(), lr=LR)
    dual = torch.optim.SGD(cmp.dual_parameters(), lr=dual_lr, maximize=True)
    optimizer = cooper.optim.SimultaneousOptimizer(cmp=cmp, primal_optimizers=primal, dual_optimizers=dual)
    curve, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        optimizer.roll()
        if step % every == 0:
            lam = cmp.constraint.multiplier.weight.detach()
            curve.append(
                {"step": step, "passes": step, "max_multiplier": lam.max().item(), **measure(model, split)}
            )
    return {"curve": curve, "seconds": time.perf_counter() - start, "passes_per_step": 1}


def summarise(runs: list[dict], passes: int) -> dict[str, float]:
    """Mean and spread over splits of the figures at the last checkpoint within ``passes``."""
    points = [max((p for p in r["curve"] if p["passes"] <= passes), key=lambda p: p["passes"]) for r in runs]
    out = {}
    for key in ("train_bce", "train_acc", "train_violation", "test_acc", "test_violation"):
        values = [p[key] for p in points]
        out[key] = statistics.mean(values)
        out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def first_feasible(run: dict, tol: float = 2e-3) -> int | None:
    """Forward passes until the training violation first drops to ``tol`` and stays there."""
    curve = run["curve"]
    for i, point in enumerate(curve):
        if all(p["train_violation"] <= tol for p in curve[i:]):
            return point["passes"]
    return None


def run(device: torch.device, smoke: bool) -> dict:
    """CPU only: an 11-parameter model (the device flag is recorded, not used)."""
    splits = 1 if smoke else 5
    steps = 10 if smoke else 300
    every = 5 if smoke else 10
    methods: dict[str, list[dict]] = {}
    for seed in range(splits):
        split = Split(seed)
        ours = run_ours(split, seed, steps, every)
        methods.setdefault("ours (η = 1, default)", []).append(ours)
        for dual_lr in DUAL_LRS:
            name = f"cooper (dual lr {dual_lr:g}{', default' if dual_lr == DEFAULT_DUAL_LR else ''})"
            methods.setdefault(name, []).append(
                run_cooper(split, seed, steps * ours["passes_per_step"], every, dual_lr)
            )
    budget = steps * (4 + 1)
    table = {}
    for name, runs in methods.items():
        table[name] = {
            "at_equal_passes": summarise(runs, budget),
            "at_equal_steps": summarise(runs, steps * runs[0]["passes_per_step"]),
            "passes_to_feasible": [first_feasible(r) for r in runs],
            "seconds_per_step": statistics.mean(r["seconds"] for r in runs) / len(runs[0]["curve"]) / every,
        }
        at = table[name]["at_equal_passes"]
        print(
            f"cooper  {name:34s} train BCE {at['train_bce']:.4f}  "
            f"train violation {at['train_violation']:.4f}  test acc {at['test_acc']:.3f}  "
            f"feasible after {table[name]['passes_to_feasible']}"
        )
    return {
        "epsilon": EPS,
        "lr": LR,
        "steps": steps,
        "splits": splits,
        "pass_budget": budget,
        "table": table,
        "curves": {name: mean_curve(runs) for name, runs in methods.items()},
    }


def mean_curve(runs: list[dict]) -> dict[str, list[float]]:
    """The checkpoints' forward passes and the training violation and BCE averaged over the splits."""
    curves = [r["curve"] for r in runs]
    return {
        "passes": [p["passes"] for p in curves[0]],
        **{
            key: [statistics.mean(c[i][key] for c in curves) for i in range(len(curves[0]))]
            for key in ("train_violation", "train_bce")
        },
    }
