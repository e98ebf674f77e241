"""Quick start: make a small digits classifier forget one digit with EraseDiff's optimizer.

A custom PyTorch loop, runs in seconds on a CPU:

    python examples/quickstart.py --forget-digit 3

Retain objective L_r: cross-entropy on the other digits. Forget objective L_f: cross-entropy of the
forgotten digit's images against random *other* labels (the "random label" target of SalUn and
EraseDiff_rl). The optimizer keeps L_r minimal subject to g(θ) = L_f(θ) − min_φ L_f(φ) ≤ 0.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F

from constrained_opt import ValueFunctionBilevelOptimizer


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forget-digit", type=int, default=3, choices=range(10))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam step size (default %(default)s)")
    parser.add_argument(
        "--inner-lr", type=float, default=1e-2, help="inner step size ξ (default %(default)s)"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=args.seed, stratify=y
    )

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        base.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        base.step()

    c = args.forget_digit
    forget_x, keep_x, keep_y = x_train[y_train == c], x_train[y_train != c], y_train[y_train != c]
    test_forget, test_keep = y_test == c, y_test != c

    def report(tag: str) -> None:
        print(
            f"{tag:>7}: accuracy on digit {c} = "
            f"{accuracy(model, x_test[test_forget], y_test[test_forget]):.3f}, "
            f"on the other digits = {accuracy(model, x_test[test_keep], y_test[test_keep]):.3f}"
        )

    report("before")
    opt = ValueFunctionBilevelOptimizer(
        model.parameters(),
        base_optimizer=torch.optim.Adam,
        lr=args.lr,
        inner_steps=1,
        inner_lr=args.inner_lr,
        eta=1.0,
    )

    # The batches of the current step. Every call of a closure within a step reads the same ones: the
    # forget closure runs at θ and at φ^K, and g = L_f(θ) − L_f(φ^K) must compare one batch.
    batch: dict[str, torch.Tensor] = {}

    def retain_closure() -> torch.Tensor:
        return F.cross_entropy(model(keep_x[batch["retain"]]), keep_y[batch["retain"]])

    def forget_closure() -> torch.Tensor:
        return F.cross_entropy(model(forget_x[batch["forget"]]), batch["other"])

    conflicts = 0
    for step in range(args.steps):
        batch["retain"] = torch.randint(len(keep_x), (128,))
        batch["forget"] = torch.randint(len(forget_x), (64,))
        batch["other"] = (c + torch.randint(1, 10, (64,))) % 10  # a random label that is not c
        stats = opt.step(retain_closure, forget_closure)
        conflicts += stats.cos_update_retain < 0
        if step % 50 == 0 or step == args.steps - 1:
            print(
                f"step {step:4d}  L_r={stats.retain_loss:.3f}  L_f={stats.forget_loss:.3f}  "
                f"g={stats.g_value:+.3f}  λ={stats.lam:.3f}  cos(δ,∇L_r)={stats.cos_update_retain:+.2f}  "
                f"cos(δ,∇g)={stats.cos_update_forget:+.2f}"
            )
    report("after")
    print(f"cos(δ, ∇L_r) < 0 on {conflicts}/{args.steps} steps (cos(δ, ∇g) > 0 is guaranteed when λ > 0)")


if __name__ == "__main__":
    main()
