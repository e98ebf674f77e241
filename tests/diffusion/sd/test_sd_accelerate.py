"""accelerate's convention, ``model, opt = accelerator.prepare(model, opt)`` then ``opt.step(Closures(...))``:
on 2 CPU/gloo processes against one process, with the GradScaler that accelerate's AcceleratedOptimizer
drives, with gradient accumulation (MicroBatches), and in the SD training loop."""

from __future__ import annotations

import json
import os
import sys

import mp_context
import pytest
import torch
from torch import nn

from constrained_opt import Closures, MicroBatches, ValueFunctionBilevelOptimizer

pytest.importorskip("accelerate")
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform != "linux",
    reason="needs torch.distributed and forkserver (Linux)",
)

WORLD, STEPS, MICRO = 2, 3, 2
LR, INNER_LR, ETA = 0.05, 0.3, 0.5
SCALE = 2.0**8
# name -> micro-batches per closure; "scaler": through the GradScaler.step path accelerate uses for fp16
SCENARIOS = {"prepared": 1, "scaler": 1, "micro_batches": MICRO}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))


def batch(kind, index, rank):
    g = torch.Generator().manual_seed(10_000 * (kind == "forget") + 100 * index + rank)
    return torch.randn(4, 3, generator=g)


def closures(model, step, ranks, micro):
    """Closures(retain, forget) of one step: each rank's data is ``micro`` micro-batches, concatenated over
    ``ranks`` (the single-process reference) or split into MicroBatches (micro > 1, one rank)."""

    def losses(kind, j):
        x = torch.cat([batch(kind, micro * step + j, r) for r in ranks])
        if kind == "retain":
            return lambda: model(x).pow(2).mean()
        return lambda: (model(x) - 1).pow(2).mean()

    if micro == 1:
        return Closures(losses("retain", 0), losses("forget", 0))
    return Closures(*(MicroBatches([losses(k, j) for j in range(micro)]) for k in ("retain", "forget")))


def make_optimizer(model, scaler=None):
    return ValueFunctionBilevelOptimizer(
        model.parameters(),
        torch.optim.Adam,
        lr=LR,
        inner_steps=2,
        inner_lr=INNER_LR,
        rule="value",
        eta=ETA,
        grad_scaler=scaler,
    )


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _worker(rank, store, out):
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD)
    )
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    accelerator = Accelerator(cpu=True)
    results = {"distributed_type": str(accelerator.distributed_type)}
    for name, micro in SCENARIOS.items():
        model = make_model()
        if name == "scaler":
            # accelerate creates its GradScaler for fp16 on GPUs only; its AcceleratedOptimizer drives a
            # CPU one the same way: scaler.step(opt, closure), then scaler.update()
            scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=2)
            wrapped = accelerator.prepare_model(model)
            opt = AcceleratedOptimizer(make_optimizer(model, scaler), scaler=scaler)
        else:
            wrapped, opt = accelerator.prepare(model, make_optimizer(model))
        stats = []
        for step in range(STEPS):
            assert opt.step(closures(wrapped, step, [rank], micro)) is None  # accelerate drops the stats
            stats.append(opt.optimizer.last_stats.as_dict())
        results[name] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()}}
        results[name]["stats"] = [{k: v for k, v in s.items() if isinstance(v, float | bool)} for s in stats]
        if name == "scaler":
            results[name]["scale"] = scaler.get_scale()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate")
    mp_context.run_ranks(_worker, WORLD, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_prepared_optimizer_on_two_processes_matches_one_process(ranks, name):
    """2 ranks through accelerator.prepare agree bit for bit and equal one process on the concatenated
    batches; the scaled run (power-of-two scale, no overflow) equals the unscaled one bit for bit."""
    assert ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    micro = SCENARIOS[name]
    reference = make_model()
    ref_opt = make_optimizer(reference)
    expected = []
    for step in range(STEPS):
        # one process, micro-batches of both ranks as MicroBatches of the concatenated ranks
        expected.append(ref_opt.step(closures(reference, step, list(range(WORLD)), micro)).as_dict())
    first, second = ranks[0][name], ranks[1][name]
    for n, p in reference.named_parameters():
        assert torch.equal(first["params"][n], second["params"][n]), f"ranks differ on {n}"
        torch.testing.assert_close(first["params"][n], p.detach(), rtol=1e-5, atol=1e-6)
        if name == "scaler":
            assert torch.equal(first["params"][n], ranks[0]["prepared"]["params"][n])
    for got, want in zip(first["stats"], expected, strict=True):
        for key in ("g_value", "lam", "retain_loss", "retain_grad_norm", "forget_grad_norm", "grad_dot"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
        assert got["skipped"] is False
    if name == "scaler":  # growth_interval=2: one update per step grows it once in 3 steps, two would twice
        assert first["scale"] == SCALE * 2
        assert [s["grad_scale"] for s in first["stats"]] == [SCALE, SCALE, SCALE * 2]


def test_overflow_through_accelerate_skips_the_step_and_backs_off_once(fresh_accelerate):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    opt = AcceleratedOptimizer(make_optimizer(model, scaler), scaler=scaler)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = batch("retain", 0, 0)
    huge = Closures(lambda: model(x).pow(2).mean(), lambda: 1e36 * (model(x) - 1).pow(2).mean())
    opt.step(huge)
    assert opt.optimizer.last_stats.skipped
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert scaler.get_scale() == SCALE / 2  # backed off once: accelerate's update, not a second one
    opt.step(closures(model, 0, [0], 1))
    assert not opt.optimizer.last_stats.skipped and opt.optimizer.steps_taken == 1
    assert scaler.get_scale() == SCALE / 2


def test_grad_scaler_step_hands_itself_over_outside_accelerate():
    """``scaler.step(opt, closures)`` passes ``grad_scaler=scaler`` (the optimizer's step has the keyword):
    the step scales with it and leaves ``update()`` to the caller; the trajectory is the unscaled one."""
    plain, scaled = make_model(), make_model()
    opt_plain, scaler = (
        make_optimizer(plain),
        torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=2),
    )
    opt_scaled = make_optimizer(scaled, scaler)
    for step in range(STEPS):
        opt_plain.step(closures(plain, step, [0], 1))
        with pytest.warns(FutureWarning, match="stop passing itself"):
            scaler.step(opt_scaled, closures(scaled, step, [0], 1))
        scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), scaled.parameters(), strict=True))
    assert scaler.get_scale() == SCALE * 2 and opt_scaled.steps_taken == STEPS  # one update per step
    other = torch.amp.GradScaler("cpu")
    other.scale(torch.ones(()))
    with pytest.raises(ValueError, match="other than the one this optimizer was built with"):
        other.step(opt_scaled, closures(scaled, 0, [0], 1))


def test_clear_errors_for_a_missing_scaler_and_accelerate_accumulation(fresh_accelerate):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # in use elsewhere (a fresh one fails in GradScaler.step, before this step)
    opt = AcceleratedOptimizer(make_optimizer(model), scaler=scaler)
    with pytest.raises(ValueError, match=r"grad_scaler=accelerator\.scaler"):
        opt.step(closures(model, 0, [0], 1))
    reset_accelerate()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    wrapped, opt = accelerator.prepare(model, make_optimizer(model))
    with pytest.raises(ValueError, match="MicroBatches"):
        opt.step(closures(wrapped, 0, [0], 1))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(TypeError, match="non-empty sequence"):
        MicroBatches([])


def test_micro_batches_are_the_mean_loss_with_one_graph_alive():
    """MicroBatches([c_1, c_2]) gives the step of the mean loss (here: of the concatenated batch), and
    each part is differentiated before the next part runs."""
    a, b = make_model(), make_model()
    opt_a, opt_b = make_optimizer(a), make_optimizer(b)
    events = []

    def part(x, j, retain):
        def loss():
            events.append(("call", j))
            out = b(x).pow(2).mean() if retain else (b(x) - 1).pow(2).mean()
            if out.requires_grad:
                out.register_hook(lambda g: events.append(("backward", j)))
            return out

        return loss

    for step in range(STEPS):
        xs = [batch("retain", step, r) for r in range(2)]
        ys = [batch("forget", step, r) for r in range(2)]
        want = opt_a.step(closures(a, step, [0, 1], 1))  # the two micro-batches concatenated
        events.clear()
        got = opt_b.step(
            MicroBatches([part(x, j, True) for j, x in enumerate(xs)]),
            MicroBatches([part(y, j, False) for j, y in enumerate(ys)]),
        )
        assert events[:4] == [("call", 0), ("backward", 0), ("call", 1), ("backward", 1)]
        for key in ("retain_loss", "forget_loss", "g_value", "lam"):
            assert got.as_dict()[key] == pytest.approx(want.as_dict()[key], rel=1e-5, abs=1e-7), key
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------------------- SD loop
FAST = "--num-forget 4 --num-retain 4 --resolution 16 --gen-steps 2 --grid-steps 2 --batch-size 1 --quiet"


def _sd_worker(rank, store, out, model, cache):
    import shlex

    import torch.distributed as dist

    from constrained_opt.cli import main

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD)
    )
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    from constrained_opt.diffusion.jobs import sd_unlearn

    records = []
    original = sd_unlearn.unlearn_sd

    def keep(job):
        records.append(original(job))
        return records[-1]

    sd_unlearn.unlearn_sd = keep
    args = f"unlearn sd {FAST} --model {model} --concept nudity --train-params lora --lora-target xattn "
    args += f"--steps 2 --lr 1e-2 --inner-steps 1 --gradient-accumulation-steps 2 --cache-dir {cache} "
    args += f"--out {os.path.join(out, 'sd')}"
    assert main(shlex.split(args)) == 0
    with open(os.path.join(out, f"sd{rank}.json"), "w") as f:
        json.dump(records[-1]["final"], f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_sd_loop_on_two_processes_with_micro_batches(tmp_path):
    """`unlearn sd` under two processes: accelerate prepares the UNet (DDP) and the optimizer, each step
    accumulates two micro-batches per closure, both ranks take the same steps, rank 0 writes."""
    import sd_tiny

    model = sd_tiny.build_pipeline(str(tmp_path / "pipe"))
    mp_context.run_ranks(_sd_worker, WORLD, tmp_path, model, str(tmp_path / "cache"))
    finals = [json.loads((tmp_path / f"sd{r}.json").read_text()) for r in range(WORLD)]
    assert finals[0] == finals[1]  # λ, losses, norms: the same averaged step on both ranks
    assert finals[0]["lam"] >= 0 and not finals[0]["skipped"]
    assert sorted(os.listdir(tmp_path / "sd")) == [
        "before_after.png",
        "history.json",
        "pytorch_lora_weights.safetensors",
        "run.json",
    ]
    settings = json.loads((tmp_path / "sd" / "run.json").read_text())["settings"]
    assert settings["gradient_accumulation_steps"] == 2
