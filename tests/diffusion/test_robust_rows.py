"""Robust forget rows of the DDPM methods (erasediff, moo): construction, steps, hyperparameters, CLI."""

from __future__ import annotations

import pytest
import torch

from constrained_opt.diffusion.jobs.comparison import plan_runs
from constrained_opt.diffusion.methods.base import Setup
from constrained_opt.diffusion.methods.registry import make_method, parse_hparams
from constrained_opt.diffusion.methods.robust_rows import RobustHyper
from constrained_opt.diffusion.runtime.errors import UsageError

FAST = dict(relearn_lr=0.1, sharpness_rho=0.05, inversion_steps=2, inversion_lr=0.1)


def tiny_unet(seed: int = 0):
    from constrained_opt.diffusion.models import build_unet

    torch.manual_seed(seed)
    return build_unet("tiny", (1, 8, 8), 10)


def batches(n: int = 4, forget_class: int = 0):
    g = torch.Generator().manual_seed(1)
    retain = (torch.randn(n, 1, 8, 8, generator=g), torch.arange(1, n + 1))
    forget = (torch.randn(n, 1, 8, 8, generator=g), torch.full((n,), forget_class))
    return retain, forget


def method(name: str = "erasediff", forget_class=0, unet=None, **hp):
    setup = Setup(unet or tiny_unet(), 10, forget_class, 1e-3, torch.Generator().manual_seed(0), 4)
    return make_method(
        name, setup, {"inner_steps": 0, **FAST, **hp} if name == "erasediff" else {**FAST, **hp}
    )


def flat(unet) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in unet.parameters()])


@pytest.mark.parametrize("name", ["erasediff", "moo"])
@pytest.mark.parametrize("form", ["relearn", "sharpness", "inversion"])
def test_each_form_steps_and_records_its_rows(name, form):
    m = method(name, robust=form)
    before = flat(m.s.unet)
    stats = m.step(*batches())
    assert not torch.equal(flat(m.s.unet), before)
    assert m.optimizer.last_stats.constraint_names == ("forget", form)
    for row in ("forget", form):
        assert {f"lam_{row}", f"forget_loss_{row}"} <= stats.keys()
    assert f"attack_loss_{form}" in stats and "attack_loss_forget" not in stats
    if name == "moo":  # the scalarised rule weights every row by forget_weight
        assert stats["lam_forget"] == stats[f"lam_{form}"] == 1.0


def test_moo_weights_each_robust_row_by_forget_weight():
    stats = method("moo", robust="relearn+sharpness", forget_weight=2.5).step(*batches())
    assert [stats[f"lam_{r}"] for r in ("forget", "relearn", "sharpness")] == [2.5, 2.5, 2.5]


def test_keep_plain_false_keeps_only_the_robust_rows():
    m = method(robust="relearn+sharpness+inversion", keep_plain=False)
    stats = m.step(*batches())
    assert m.optimizer.last_stats.constraint_names == ("relearn", "sharpness", "inversion")
    assert "lam_forget" not in stats and all(f"lam_{r}" in stats for r in ("relearn", "sharpness"))


def test_sharpness_relearn_attack_moves_against_the_relearning_gradient():
    a = method(robust="sharpness", sharpness_attack="relearn").step(*batches())
    b = method(robust="sharpness").step(*batches())
    assert a["attack_loss_sharpness"] < 0 < b["attack_loss_sharpness"]  # L_a = −L_train vs L_a = L_c
    assert a["forget_loss_sharpness"] != b["forget_loss_sharpness"]


def test_inversion_leaves_the_class_table_alone_and_restarts_each_step():
    m = method(robust="inversion")
    table = m.s.unet.class_embedding.weight
    for _ in range(2):
        real = table.detach().clone()
        m.rows.embedding.add_(100.0)  # a leftover e* must not carry into the next step
        stats = m.step(*batches())
        assert torch.equal(m.rows.embedding, real[0])  # the step began from E[c_f] and put e back
        assert m.rows.embedding.data_ptr() != table.data_ptr() and not m.rows.embedding.requires_grad
        assert abs(stats["attack_loss_inversion"]) < 100  # not the loss at E[c_f] + 100


def test_inversion_ascends_its_attack_loss():
    m = method(robust="inversion", inversion_steps=3, inversion_lr=0.05)
    m.step(*batches())
    attack = m.optimizer.last_stats.attack_losses[1]  # L_a = −L_train(θ, e) at e_0, e_1, e_2
    assert len(attack) == 3 and attack[0] < attack[1] < attack[2]


def test_plain_path_is_bit_identical_to_the_plain_closure():
    from constrained_opt.diffusion.losses import forget_loss

    class Plain(type(method())):  # today's constraints: one closure on the pooled forget batch
        def constraints(self, bf, target):
            return lambda: forget_loss(self.eps, bf, target)

    setup = lambda: Setup(tiny_unet(), 10, 0, 1e-3, torch.Generator().manual_seed(0), 4)  # noqa: E731
    new, old = make_method("erasediff", setup(), {}), Plain(setup())
    for _ in range(2):
        a, b = new.step(*batches()), old.step(*batches())
    assert torch.equal(flat(new.s.unet), flat(old.s.unet)) and a == b
    assert "lam_forget" not in a


def test_several_forget_classes_refuse_inversion_but_take_relearn():
    with pytest.raises(UsageError, match="single forget class"):
        method(robust="inversion", forget_class=(0, 3))
    m = method(robust="relearn", forget_class=(0, 3))
    retain, forget = batches()
    forget = (forget[0], torch.tensor([0, 3, 0, 3]))
    assert "lam_relearn" in m.step(retain, forget)


@pytest.mark.parametrize(
    "hp, message",
    [
        ({"robust": "relearn+ssam"}, "relearn, sharpness, inversion"),
        ({"robust": "relearn+relearn"}, "a form given twice"),
        ({"keep_plain": False}, "needs robust"),
        ({"robust": "sharpness", "sharpness_attack": "x"}, "constraint, relearn"),
        ({"robust": "relearn", "relearn_steps": 0}, "relearn_steps"),
        ({"robust": "relearn", "relearn_lr": -1.0}, "relearn_lr"),
    ],
)
def test_bad_robust_hyperparameters_are_refused(hp, message):
    with pytest.raises(UsageError, match=message):
        method(**hp)


@pytest.mark.parametrize("name", ["erasediff_per_class", "erasediff_shared_adam"])
def test_other_erasediff_variants_refuse_robust_rows(name):
    setup = Setup(tiny_unet(), 10, (0, 3), 1e-3, torch.Generator().manual_seed(0), 4)
    with pytest.raises(UsageError, match="robust"):
        make_method(name, setup, {"robust": "relearn"})


@pytest.mark.parametrize("text, value", [("true", True), ("False", False), ("1", True), ("0", False)])
def test_parse_hparams_reads_bools(text, value):
    assert parse_hparams("erasediff", ["robust=relearn", f"keep_plain={text}"])["keep_plain"] is value


def test_parse_hparams_refuses_a_word_that_is_not_a_bool():
    with pytest.raises(UsageError, match="keep_plain of erasediff needs a bool"):
        parse_hparams("erasediff", ["robust=relearn", "keep_plain=no"])


def test_variant_with_two_forms_plans_and_demo_robust_adds_rows():
    runs = plan_runs(
        (),
        variants=("rob=erasediff:robust=relearn+inversion,relearn_lr=1.0",),
        robust=("sharpness",),
        hp=("erasediff_sharpness.sharpness_rho=0.2",),
    )
    by = {r.label: r for r in runs}
    assert by["rob"].method == "erasediff" and by["rob"].hparams["robust"] == "relearn+inversion"
    assert by["rob"].hparams["relearn_lr"] == 1.0
    assert by["erasediff_sharpness"].hparams["robust"] == "sharpness"
    assert by["erasediff_sharpness"].hparams["sharpness_rho"] == 0.2
    assert "robust" not in by["erasediff"].hparams
    (run,) = plan_runs((), hp=("erasediff.robust=relearn", "erasediff.keep_plain=false"))
    assert run.hparams["robust"] == "relearn" and run.hparams["keep_plain"] is False
    with pytest.raises(UsageError, match="relearn, sharpness, inversion"):
        plan_runs((), robust=("ssam",))


def test_a_run_made_before_the_robust_settings_still_resumes():
    import dataclasses

    from constrained_opt.diffusion.methods.erasediff import BilevelHyper
    from constrained_opt.diffusion.runtime.resume import check_resume, run_config

    defaults = dataclasses.asdict(BilevelHyper())
    old = {k: v for k, v in defaults.items() if k not in dataclasses.asdict(RobustHyper())}
    old["max_grad_norm"] = defaults["max_grad_norm"]
    saved = run_config("erasediff", 0, 10, 4, 1e-4, 0, old)
    assert (
        check_resume("ckpt", saved, run_config("erasediff", 0, 10, 4, 1e-4, 0, defaults), 5, "", defaults)
        is None
    )
    robust = {**defaults, "robust": "relearn"}
    with pytest.raises(UsageError, match="robust"):
        check_resume("ckpt", saved, run_config("erasediff", 0, 10, 4, 1e-4, 0, robust), 5, "", defaults)
    with pytest.raises(UsageError, match="robust"):  # without the defaults, as before: any new key differs
        check_resume("ckpt", saved, run_config("erasediff", 0, 10, 4, 1e-4, 0, defaults), 5)


@pytest.mark.parametrize("max_norm, expected", [(None, 1.0), (0.25, 0.25), (0.0, None)])
def test_relearn_row_clips_its_steps_like_the_attack(max_norm, expected):
    """relearn_max_norm (default 1, the relearning attack's clip) reaches the core's Relearn; 0 = none."""
    hp = {} if max_norm is None else {"relearn_max_norm": max_norm}
    m = method(robust="relearn", **hp)
    _, forget = batches()
    rows = m.rows.constraints(m.eps, m.diffuse(forget), torch.zeros(4, 1, 8, 8))
    assert rows["relearn"].max_norm == expected


def test_relearn_sign_reaches_the_core_without_a_clip_and_old_runs_still_resume():
    """relearn_sign=true gives Relearn(sign=True) and no clip (relearn_max_norm does not act, so it is not
    recorded); a relearning row recorded before relearn_sign existed resumes at its default, false."""
    import dataclasses

    from constrained_opt.diffusion.methods.erasediff import BilevelHyper
    from constrained_opt.diffusion.runtime.resume import check_resume

    m = method(robust="relearn", relearn_sign=True, relearn_lr=1e-3)
    _, forget = batches()
    (row,) = [m.rows.constraints(m.eps, m.diffuse(forget), torch.zeros(4, 1, 8, 8))["relearn"]]
    assert row.sign and row.max_norm is None and row.lr == 1e-3
    assert "relearn_max_norm" not in RobustHyper(robust="relearn", relearn_sign=True).recorded()
    defaults = dataclasses.asdict(BilevelHyper())
    current = BilevelHyper(robust="relearn").recorded()
    saved = {"method": "erasediff", "hparams": {k: v for k, v in current.items() if k != "relearn_sign"}}
    check_resume("old row", saved, {"method": "erasediff", "hparams": current}, None, "", defaults)
    signed = BilevelHyper(robust="relearn", relearn_sign=True).recorded()
    with pytest.raises(UsageError, match="relearn_sign"):
        check_resume("old row", saved, {"method": "erasediff", "hparams": signed}, None, "", defaults)
    with pytest.raises(UsageError, match="relearn_sign must be true or false"):
        method(robust="relearn", relearn_sign="yes")


def test_a_run_records_only_the_settings_that_act():
    """Unused forms' settings are not recorded, so changing their defaults keeps old runs resumable,
    while a change to a setting that acts is still refused."""
    from constrained_opt.diffusion.runtime.resume import check_resume

    assert {"relearn_lr", "inversion_lr", "keep_plain"}.isdisjoint(RobustHyper().recorded())
    recorded = RobustHyper(robust="inversion", inversion_lr=1.0).recorded()
    assert (
        recorded["inversion_lr"] == 1.0 and "relearn_lr" not in recorded and "sharpness_rho" not in recorded
    )
    old = {"method": "erasediff", "hparams": {**RobustHyper().recorded(), "inversion_lr": 0.5}}
    check_resume("plain", old, {"method": "erasediff", "hparams": RobustHyper().recorded()})
    saved = {"method": "erasediff", "hparams": recorded}
    with pytest.raises(UsageError, match="inversion_lr"):
        check_resume("inv", saved, {"method": "erasediff", "hparams": {**recorded, "inversion_lr": 4.0}})
