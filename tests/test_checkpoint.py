"""Checkpoints: bit-identical resume, atomicity under failure and SIGKILL, clear errors on bad input."""

import json
import os
import random
import signal
import sys

import mp_context
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from constrained_opt import ValueFunctionBilevelOptimizer
from constrained_opt.checkpoint import load_checkpoint, save_checkpoint


class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Dropout(0.2), nn.Linear(width, 2))

    def forward(self, x):
        return self.body(x)


def build(seed, width=8, scaler=False):
    torch.manual_seed(seed)
    model = Net(width).double()
    opt = ValueFunctionBilevelOptimizer(
        model.parameters(),
        torch.optim.AdamW,
        lr=1e-2,
        weight_decay=0.01,
        inner_steps=2,
        inner_lr=0.1,
        rule="value",
        eta=0.5,
        grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=2) if scaler else None,
    )
    return model, opt


def closures(model):
    """Every batch is sampled from the global torch, numpy and Python RNGs (and dropout uses torch's)."""

    def sample():
        x = torch.randn(6, 4, dtype=torch.float64)
        return x * float(np.random.uniform(0.5, 1.5)) + random.random()

    def retain():
        return model(sample()).pow(2).mean()

    def forget():
        return (model(sample()) - 1).pow(2).mean()

    return retain, forget


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.mark.parametrize("scaler", [False, True])
def test_resume_gives_the_identical_trajectory(tmp_path, scaler):
    path = tmp_path / "ckpt.safetensors"
    seed_all(0)
    model, opt = build(0, scaler=scaler)
    retain, forget = closures(model)
    for _ in range(3):
        opt.step(retain, forget)
    save_checkpoint(path, model, opt, extra={"step": 3, "note": ("a", 1.5), "gen": torch.arange(3)})
    for _ in range(3):
        opt.step(retain, forget)
    expected, expected_state = flat(model), opt.state_dict()
    expected_draw = torch.rand(3), np.random.rand(), random.random()

    seed_all(123)  # a fresh process would start from other RNG states and another init
    resumed, resumed_opt = build(1, scaler=scaler)
    extra = load_checkpoint(path, resumed, resumed_opt)
    assert extra["step"] == 3 and extra["note"] == ("a", 1.5) and torch.equal(extra["gen"], torch.arange(3))
    assert resumed_opt.steps_taken == 3
    retain2, forget2 = closures(resumed)
    for _ in range(3):
        resumed_opt.step(retain2, forget2)
    assert torch.equal(flat(resumed), expected)
    state = resumed_opt.state_dict()
    assert state["param_groups"] == expected_state["param_groups"]
    assert state["bilevel"] == expected_state["bilevel"]
    for k, v in expected_state["state"].items():
        for name, t in v.items():
            assert torch.equal(state["state"][k][name], t), name
    draw = torch.rand(3), np.random.rand(), random.random()
    assert torch.equal(draw[0], expected_draw[0]) and draw[1:] == expected_draw[1:]


def saved_run(path):
    seed_all(0)
    model, opt = build(0)
    retain, forget = closures(model)
    opt.step(retain, forget)
    save_checkpoint(path, model, opt, extra={"step": 1})
    return model, opt


def assert_loads_as(path, model):
    fresh, fresh_opt = build(5)
    assert load_checkpoint(path, fresh, fresh_opt)["step"] == 1
    assert torch.equal(flat(fresh), flat(model))


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    model, opt = saved_run(path)
    before = path.read_bytes()
    real_save = safetensors.torch.save_file

    def dies_midway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:  # half of the bytes are out when the disk fills up
            fh.truncate(os.path.getsize(filename) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    opt.step(*closures(model))
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model, opt, extra={"step": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]  # the partial temporary file was removed
    monkeypatch.undo()
    reference, _ = saved_run(tmp_path / "reference.safetensors")
    assert_loads_as(path, reference)


def _save_and_hang(path, ready):
    """Child process: start a save whose writer stops halfway and signals the parent."""
    real_save = safetensors.torch.save_file

    def hangs_midway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(os.path.getsize(filename) // 2)
        ready.set()
        signal.pause()

    safetensors.torch.save_file = hangs_midway
    model, opt = build(9, width=8)
    save_checkpoint(path, model, opt, extra={"step": 99})


@pytest.mark.skipif(sys.platform != "linux", reason="forkserver + SIGKILL")
def test_save_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    model, _ = saved_run(path)
    before = path.read_bytes()
    ctx = mp_context.context()
    ready = ctx.Event()
    child = ctx.Process(target=_save_and_hang, args=(path, ready))
    child.start()
    assert ready.wait(timeout=60), "the child never reached the middle of its save"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    assert path.read_bytes() == before
    leftovers = [name for name in os.listdir(tmp_path) if name != path.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.safetensors.")  # stale, never read
    assert_loads_as(path, model)


def test_bad_inputs_raise_clear_errors_and_modify_nothing(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    saved_run(path)
    model, opt = build(7)
    wide, wide_opt = build(7, width=16)
    sgd = ValueFunctionBilevelOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    split = ValueFunctionBilevelOptimizer(
        [{"params": list(model.body[0].parameters())}, {"params": list(model.body[3].parameters())}],
        torch.optim.AdamW,
        lr=1e-2,
    )
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, other)
    params, rng = flat(model).clone(), torch.get_rng_state()

    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*missing"):
        load_checkpoint(tmp_path / "missing.safetensors", model, opt)
    with pytest.raises(ValueError, match=r"does not match the model \(shape mismatch: body\.0\.weight"):
        load_checkpoint(path, wide, wide_opt)
    with pytest.raises(ValueError, match=r"holds the state of .*AdamW.*but the optimizer is .*SGD"):
        load_checkpoint(path, model, sgd)
    with pytest.raises(ValueError, match=r"param groups of sizes \[4\].*has \[2, 2\]"):
        load_checkpoint(path, model, split)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint(garbage, model, opt)
    with pytest.raises(ValueError, match=r"not written by constrained_opt\.save_checkpoint"):
        load_checkpoint(other, model, opt)

    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(flat(model), params) and torch.equal(flat(wide), flat(build(7, width=16)[0]))
    assert all(o.state_dict()["state"] == {} for o in (opt, wide_opt, sgd, split))

    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"cannot checkpoint a device at extra\['where'\]"):
        save_checkpoint(path, model, opt, extra={"where": torch.device("cpu")})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "no" / "dir.safetensors", model, opt)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == sorted(
        ["ckpt.safetensors", "garbage.safetensors", "other.safetensors"]
    )


def test_ddp_style_prefix_gets_a_hint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    model, _ = build(0)
    wrapper = nn.Module()
    wrapper.module = model
    save_checkpoint(path, wrapper)
    with pytest.raises(ValueError, match=r"model\.module or accelerator\.unwrap_model"):
        load_checkpoint(path, model)


def test_tied_weights_are_saved_and_restored(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    save_checkpoint(path, model)
    torch.manual_seed(1)
    other = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    other[1].weight = other[0].weight
    load_checkpoint(path, other, restore_rng=False)
    assert torch.equal(other[0].weight, model[0].weight) and other[1].weight is other[0].weight


# ---------------------------------------------------------------------- all or nothing


def rewrite(path, edit_structure=None, edit_metadata=None, checksum=True):
    """Rewrite a checkpoint's metadata as a crafted file would, with a valid checksum unless told not to."""
    from constrained_opt import checkpoint

    with safetensors.safe_open(path, framework="pt") as fh:
        metadata, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    if edit_structure is not None:
        structure = json.loads(metadata["structure"])
        edit_structure(structure)
        metadata["structure"] = json.dumps(structure)
    if edit_metadata is not None:
        edit_metadata(metadata)
    if checksum:
        metadata["sha256"] = checkpoint._digest(metadata, tensors)
    safetensors.torch.save_file(tensors, path, metadata=metadata)


def snapshot(model, opt):
    state = opt.state_dict()["state"]
    return flat(model).clone(), {k: {n: t.clone() for n, t in v.items()} for k, v in state.items()}


def assert_untouched(model, opt, before, rng=None):
    params, state = before
    assert torch.equal(flat(model), params)
    now = opt.state_dict()["state"]
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k][n], t) for k, v in state.items() for n, t in v.items())
    if rng is not None:
        assert torch.equal(torch.get_rng_state(), rng)


def stepped(seed):
    """A model and optimizer with non-trivial state (one step taken), to load into."""
    seed_all(seed)
    model, opt = build(seed)
    opt.step(*closures(model))
    return model, opt


def test_crafted_rng_state_is_refused_before_model_or_optimizer_change(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    saved_run(path)

    def truncate_numpy_keys(structure):  # numpy's set_state raised IndexError after the model was loaded
        numpy_state = structure["rng"]["__dict__"][1][1]
        numpy_state[1] = numpy_state[1][:5]

    rewrite(path, truncate_numpy_keys)
    model, opt = stepped(3)
    before, rng = snapshot(model, opt), torch.get_rng_state()
    with pytest.raises(ValueError, match=r"invalid RNG state .*restore_rng=False"):
        load_checkpoint(path, model, opt)
    assert_untouched(model, opt, before, rng)
    assert load_checkpoint(path, model, opt, restore_rng=False)["step"] == 1  # the rest is usable


def drop(encoded_dict, key):
    items = encoded_dict["__dict__"]
    items[:] = [item for item in items if item[0] != key]


@pytest.mark.parametrize(
    ("edit_structure", "edit_metadata"),
    [
        (None, lambda m: m.update(structure="{not json")),
        (lambda s: s.pop("rng"), None),
        (lambda s: s["model"].append("ghost.weight"), None),
        (lambda s: s["optimizer"].update(state={"__tensor__": "t/999"}), None),
        (lambda s: drop(s["optimizer"]["state"], "param_groups"), None),
        (lambda s: s["optimizer"].update(param_shapes=[[1]]), None),
        (None, lambda m: m.update(version="two")),
    ],
    ids=["json", "no-rng", "missing-tensor", "dangling-ref", "no-param-groups", "shapes", "version"],
)
def test_malformed_metadata_gives_a_value_error_and_changes_nothing(tmp_path, edit_structure, edit_metadata):
    path = tmp_path / "ckpt.safetensors"
    saved_run(path)
    rewrite(path, edit_structure, edit_metadata)
    model, opt = stepped(3)
    before, rng = snapshot(model, opt), torch.get_rng_state()
    with pytest.raises(ValueError, match="malformed"):
        load_checkpoint(path, model, opt)
    assert_untouched(model, opt, before, rng)


def test_optimizer_over_other_parameters_with_equal_group_sizes_is_refused(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    saved_run(path)
    model, _ = stepped(3)
    w0, b0, w1, b1 = model.parameters()
    swapped = ValueFunctionBilevelOptimizer([b0, w0, w1, b1], torch.optim.AdamW, lr=1e-2, inner_steps=2)
    with pytest.raises(ValueError, match=r"parameters of other shapes \(group 0 parameter 0: saved \(8, 4\)"):
        load_checkpoint(path, model, swapped)
    assert swapped.state_dict()["state"] == {}


def test_a_flipped_payload_bit_is_detected(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    saved_run(path)
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(0)
    model, opt = stepped(3)
    before = snapshot(model, opt)
    for position in [header, len(data) - 1, *rng.integers(header, len(data), 6)]:
        flipped = bytearray(data)
        flipped[position] ^= 1 << int(rng.integers(8))
        path.write_bytes(flipped)
        with pytest.raises(ValueError, match="fails its SHA-256 check"):
            load_checkpoint(path, model, opt)
        assert_untouched(model, opt, before)
    path.write_bytes(data)
    load_checkpoint(path, model, opt)


class Counter(nn.Module):
    """A module with non-tensor extra state (``get_extra_state``), as torch.nn allows."""

    def __init__(self, fail=False):
        super().__init__()
        self.lin, self.calls, self.fail = nn.Linear(4, 2).double(), 0, fail

    def get_extra_state(self):
        return {"calls": self.calls, "scale": torch.full((2,), float(self.calls))}

    def set_extra_state(self, state):
        if self.fail:
            raise RuntimeError("incompatible extra state")
        self.calls = state["calls"]


def test_modules_with_extra_state_save_and_load(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    torch.manual_seed(0)
    model = Counter()
    model.calls = 7
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.lin(torch.ones(1, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    save_checkpoint(path, model, opt)
    fresh = Counter()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    load_checkpoint(path, fresh, fresh_opt)
    assert fresh.calls == 7 and torch.equal(fresh.lin.weight, model.lin.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    # set_extra_state runs user code the checks cannot foresee: when it raises, everything is put back.
    failing = Counter(fail=True)
    failing_opt = torch.optim.Adam(failing.parameters(), lr=0.1)
    failing.lin(torch.ones(1, 4, dtype=torch.float64)).sum().backward()
    failing_opt.step()
    weight, exp_avg = failing.lin.weight.clone(), failing_opt.state_dict()["state"][0]["exp_avg"].clone()
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"incompatible extra state.*left as they were"):
        load_checkpoint(path, failing, failing_opt)
    assert torch.equal(failing.lin.weight, weight) and failing.calls == 0
    assert torch.equal(failing_opt.state_dict()["state"][0]["exp_avg"], exp_avg)
    assert torch.equal(torch.get_rng_state(), rng)


def test_version_1_checkpoints_still_load_with_a_warning(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    model, _ = saved_run(path)

    def as_version_1(structure):
        structure.pop("model_extra")
        structure["optimizer"].pop("param_shapes")

    def v1_metadata(metadata):
        metadata["version"] = "1"
        metadata.pop("sha256")

    rewrite(path, as_version_1, v1_metadata, checksum=False)
    fresh, fresh_opt = build(5)
    with pytest.warns(UserWarning, match="version-1 checkpoint: it carries no checksum"):
        assert load_checkpoint(path, fresh, fresh_opt)["step"] == 1
    assert torch.equal(flat(fresh), flat(model)) and fresh_opt.steps_taken == 1


def test_per_constraint_lists_are_each_groups_own_before_and_after_a_round_trip(tmp_path):
    """A per-constraint η list is copied into every param group and ``defaults`` (as a checkpoint
    round trip leaves them): changing one group's list changes no other group, before and after."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    eta = [1.0, 0.5]
    opt = ValueFunctionBilevelOptimizer(
        [{"params": model[0].parameters()}, {"params": model[1].parameters()}],
        torch.optim.SGD,
        lr=0.1,
        eta=eta,
        projection="per_group",
    )
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})

    def owners():
        return [opt.defaults["eta"], *(g["eta"] for g in opt.param_groups)]

    assert len({id(v) for v in [eta, *owners()]}) == 5 and all(v == [1.0, 0.5] for v in owners())
    opt.param_groups[0]["eta"][0] = 2.0
    assert [v[0] for v in owners()] == [1.0, 2.0, 1.0, 1.0] and eta == [1.0, 0.5]
    save_checkpoint(tmp_path / "c.safetensors", model, opt)
    opt.param_groups[1]["eta"][1] = 7.0
    load_checkpoint(tmp_path / "c.safetensors", model, opt)
    assert len({id(v) for v in owners()}) == 4
    assert [v for v in owners()] == [[1.0, 0.5], [2.0, 0.5], [1.0, 0.5], [1.0, 0.5]]
