"""Robust constraints under DDP and FSDP2 on CPU/gloo: 2 ranks match one process over the concatenated
batches.

The attackers' gradients into the parameters are averaged by DDP (their backward runs into the
constraint's row), the Inversion's input gradient is all-reduced by the optimizer (every rank holds the
same x), and the attackers' losses join the one loss all-reduce; so θ′, x* and every row are those of
the single process on the whole batch (tests/test_distributed.py explains the setup).
"""

from __future__ import annotations

import os
import sys

import mp_context
import pytest
import torch
from torch import nn

from constrained_opt import Inversion, Relearn, Sharpness, ValueFunctionBilevelOptimizer

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform != "linux",
    reason="needs torch.distributed and forkserver (Linux)",
)

WORLD, STEPS = 2, 2
SCENARIOS = ("ddp", "fsdp")


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))


def batch(kind, step, rank):
    g = torch.Generator().manual_seed(10_000 * (kind == "forget") + 100 * step + rank)
    return torch.randn(4, 3, generator=g)


def train(model, module, ranks):
    """STEPS steps with a Relearn, a Sharpness and an Inversion constraint (rule "value", K = 1)."""
    emb = torch.zeros(3)
    opt = ValueFunctionBilevelOptimizer(
        module.parameters(), torch.optim.Adam, lr=0.05, inner_steps=1, inner_lr=0.3, rule="value", eta=0.5
    )
    stats = []
    for step in range(STEPS):
        xr = torch.cat([batch("retain", step, r) for r in ranks])
        xf = torch.cat([batch("forget", step, r) for r in ranks])
        forget = lambda xf=xf: (model(xf + emb) - 1.0).pow(2).mean()  # noqa: E731
        relearn = lambda xf=xf: (model(xf + emb) + 1.0).pow(2).mean()  # noqa: E731
        constraints = {
            "relearn": Relearn(forget, attack=relearn, steps=2, lr=0.2),
            "sam": Sharpness(forget, rho=0.1, attack=relearn),
            "inv": Inversion(forget, input=emb, steps=2, lr=0.1, eps=0.15),
        }
        stats.append(opt.step(lambda xr=xr: model(xr).pow(2).mean(), constraints).as_dict())
    return stats


def _worker(rank, store, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    results = {}
    for name in SCENARIOS:
        model = make_model()
        if name == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            mesh = init_device_mesh("cpu", (WORLD,))
            fully_shard(model[0], mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh, reshard_after_forward=True)
        stats = train(wrapped, model, [rank])
        params = mp_context.full_params(model)
        results[name] = {"params": params, "stats": stats}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Results of both ranks."""
    out = tmp_path_factory.mktemp("robust_ddp")
    mp_context.run_ranks(_worker, WORLD, out, timeout=120)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_ranks_match_one_process_with_every_adversary(ranks, name):
    first, second = ranks[0][name], ranks[1][name]
    model = make_model()
    expected = train(model, model, list(range(WORLD)))
    for n, p in model.named_parameters():
        assert torch.equal(first["params"][n], second["params"][n]), f"ranks differ on {n}"
        torch.testing.assert_close(first["params"][n], p.detach(), rtol=1e-5, atol=1e-6)
    for got0, got1, want in zip(first["stats"], second["stats"], expected, strict=True):
        assert got0["lams"] == got1["lams"] and got0["attack_losses"] == got1["attack_losses"]
        for key in ("lams", "g_values", "forget_losses", "forget_grad_norms", "grad_dots"):
            assert got0[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
        for got, ref in zip(got0["attack_losses"], want["attack_losses"], strict=True):
            assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
