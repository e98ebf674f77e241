"""Data parallelism on CPU/gloo: 2 ranks must match one process over the concatenated batches.

One group of 2 processes (forkserver children: tests/mp_context.py) runs every scenario (DDP with both
gradient layouts, accelerate, FSDP2) and saves its final parameters and stats; the tests compare them
with a single-process run in which each batch is the concatenation of the two ranks' batches. Loss
means over equal-sized halves average to the mean over the whole, so with gradients averaged by
DDP/FSDP and the loss values averaged by the optimizer, the two runs solve the same problem.

The rule is ``"value"`` (a_t = η·g), so the per-rank loss values enter λ: without their all-reduce
each rank would compute its own λ and the ranks would drift apart.
"""

from __future__ import annotations

import os
import sys

import mp_context
import pytest
import torch
from torch import nn

from constrained_opt import ValueFunctionBilevelOptimizer

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform != "linux",
    reason="needs torch.distributed and forkserver (Linux)",
)

WORLD = 2
STEPS = 3
LR, INNER_LR, ETA = 0.05, 0.3, 0.5
# name -> (model kind, inner_steps, number of constraints m)
SCENARIOS = {
    "ddp_k0": ("seq", 0, 1),
    "ddp_k2": ("seq", 2, 1),
    "ddp_bucket_view_k2": ("net", 2, 1),
    "ddp_m2_k2": ("seq", 2, 2),
    "accelerate_k2": ("seq", 2, 1),
    "fsdp_k0": ("net", 0, 1),
    "fsdp_k2": ("net", 2, 1),
    "fsdp_m2_k2": ("net", 2, 2),
}
# The m constraints pull the output towards different targets, so their gradients are not parallel.
TARGETS = (1.0, -0.5)


class Net(nn.Module):
    """``head`` is used by the retain loss only, so the forget backward leaves it without gradient."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x, retain=True):
        h = self.body(x)
        return self.head(h) if retain else h


class Seq(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))

    def forward(self, x, retain=True):
        return super().forward(x)


def make_model(kind):
    torch.manual_seed(0)
    return Net() if kind == "net" else Seq()


def batch(kind, index, rank):
    g = torch.Generator().manual_seed(10_000 * (kind == "forget") + 100 * index + rank)
    return torch.randn(4, 3, generator=g)


def train(model, module, K, ranks, m=1):
    """Run STEPS steps; each closure call draws the next batch of every rank in ``ranks`` (concatenated).
    With m > 1 there is one forget closure per target in ``TARGETS[:m]``, each with its own batches."""
    opt = ValueFunctionBilevelOptimizer(
        module.parameters(), torch.optim.Adam, lr=LR, inner_steps=K, inner_lr=INNER_LR, rule="value", eta=ETA
    )
    calls, stats = [0] * m, []

    def forget(i):
        def closure():
            x = torch.cat([batch("forget", 1000 * i + calls[i], r) for r in ranks])
            calls[i] += 1
            return (model(x, retain=False) - TARGETS[i]).pow(2).mean()

        return closure

    for step in range(STEPS):
        xr = torch.cat([batch("retain", step, r) for r in ranks])
        constraints = forget(0) if m == 1 else [forget(i) for i in range(m)]
        stats.append(opt.step(lambda xr=xr: model(xr).pow(2).mean(), constraints).as_dict())
    return stats


def _worker(rank, store, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD)
    )
    os.environ["OMP_NUM_THREADS"] = "1"  # accelerate reads it (and the four above) on CPU
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    results = {}
    for name, (kind, K, m) in SCENARIOS.items():
        model = make_model(kind)
        if name.startswith("ddp"):
            bucket_view = name == "ddp_bucket_view_k2"
            wrapped = nn.parallel.DistributedDataParallel(
                model, gradient_as_bucket_view=bucket_view, find_unused_parameters=kind == "net"
            )
            stats = train(wrapped, model, K, [rank], m)
        elif name.startswith("accelerate"):
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=True)
            wrapped = accelerator.prepare(model)
            stats = train(wrapped, accelerator.unwrap_model(wrapped), K, [rank])
            prepared = accelerator.prepare(
                ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=0.0)
            )
            x = batch("retain", 0, rank)
            loss = lambda m=model, x=x: m(x).sum()  # noqa: E731
            try:
                prepared.step(loss, loss)
            except TypeError as exc:
                results["accelerated_optimizer_error"] = str(exc)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            fully_shard(model.body[0], mesh=mesh)
            fully_shard(model, mesh=mesh, reshard_after_forward=True)
            stats = train(model, model, K, [rank], m)
        params = mp_context.full_params(model)
        results[name] = {"params": params, "stats": stats}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Results of both ranks."""
    out = tmp_path_factory.mktemp("ddp")
    mp_context.run_ranks(_worker, WORLD, out, timeout=120)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_ranks_agree_and_match_single_process(ranks, name):
    kind, K, m = SCENARIOS[name]
    model = make_model(kind)
    expected = train(model, model, K, list(range(WORLD)), m)
    first, second = ranks[0][name], ranks[1][name]
    for n, p in model.named_parameters():
        assert torch.equal(first["params"][n], second["params"][n]), f"ranks differ on {n}"
        torch.testing.assert_close(first["params"][n], p.detach(), rtol=1e-5, atol=1e-6)
    for got_rank0, got_rank1, want in zip(first["stats"], second["stats"], expected, strict=True):
        assert got_rank0["lam"] == got_rank1["lam"]  # every rank computes the same λ
        # the buffers hold the averaged gradients (norms, dot) and the losses are averaged (g, λ)
        for key in ("g_value", "lam", "retain_loss", "retain_grad_norm", "forget_grad_norm", "grad_dot"):
            assert got_rank0[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
        assert got_rank0["lams"] == got_rank1["lams"]
        for key in ("lams", "g_values", "forget_grad_norms", "grad_dots"):
            assert got_rank0[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    if m > 1:  # the constraints must be genuinely distinct problems for the scenario to test anything
        assert any(len(set(s["lams"])) > 1 for s in expected)
    if K > 0:
        assert all(s["g_value"] != 0 for s in expected)


def test_accelerated_optimizer_cannot_take_two_closures(ranks):
    """accelerate's AcceleratedOptimizer.step(closure=None) forwards one argument, so the two-argument
    form cannot pass through a prepared optimizer; the one-argument ``Closures`` form does
    (tests/test_sd_accelerate.py)."""
    assert "positional argument" in ranks[0]["accelerated_optimizer_error"]


def test_process_group_argument_is_checked():
    with pytest.raises(TypeError, match=r"process_group must be 'auto', None or a torch\.distributed"):
        ValueFunctionBilevelOptimizer(Seq().parameters(), torch.optim.SGD, lr=0.1, process_group="world")
    model = Seq()
    opt = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, process_group=None)
    x = batch("retain", 0, 0)
    assert opt.step(lambda: model(x).pow(2).mean(), lambda: (model(x) - 1).pow(2).mean()).lam >= 0
