"""``constrained-opt``: ``demo``, ``train-base``, ``unlearn {ddpm,sd}``, ``evaluate`` and ``sd ...``.

Subcommands live in registries so other modules add theirs without touching the others:
``@command(name, help)`` for a top-level subcommand and ``@unlearn_target(name, help)`` for
``constrained-opt unlearn <target>``. A builder receives its ``argparse`` parser, adds its arguments
and returns the function that runs the parsed namespace. Heavy imports happen inside the runners.

User errors print one line on stderr and exit with status 2, never a traceback: argparse errors (every
numeric option is range-checked while parsing, see :mod:`~constrained_opt.diffusion.cli.args`),
:class:`~constrained_opt.diffusion.errors.UsageError`, and the optimizer refusing a step (a diverging
run) or a setting. Ctrl-C exits with 130 and says how to resume. ``--help`` shows every default.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from .diffusion.cli.args import COUNT, INDEX, NON_NEGATIVE, POSITIVE, SEED, int_in
from .diffusion.cli.parser import add_common as _add_common
from .diffusion.multiclass import class_list

Runner = Callable[[argparse.Namespace], None]
Builder = Callable[[argparse.ArgumentParser], Runner]

COMMANDS: dict[str, tuple[str, Builder]] = {}
UNLEARN_TARGETS: dict[str, tuple[str, Builder]] = {}


def command(name: str, help: str) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        COMMANDS[name] = (help, builder)
        return builder

    return register


def unlearn_target(name: str, help: str) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        UNLEARN_TARGETS[name] = (help, builder)
        return builder

    return register


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option whose help does not already state its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = any(default is v for v in (None, False, argparse.SUPPRESS)) or default == []
        if "default" in text.lower() or unset:
            return text
        return f"{text} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and every default shown in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _add_eval(p: argparse.ArgumentParser, per_class: int = 100) -> None:
    g = p.add_argument_group("evaluation sampling")
    g.add_argument(
        "--per-class",
        type=int_in(4, name="count"),
        default=per_class,
        help="generated images per class, at least 4 for k = 3 precision/recall (default %(default)s)",
    )
    g.add_argument("--sampler", default="ddim", help="ddim (default) or ddpm (all 1000 steps)")
    g.add_argument(
        "--sampling-steps",
        type=int_in(1, 1000, name="count"),
        default=50,
        help="DDIM steps (default %(default)s)",
    )
    g.add_argument("--guidance", type=NON_NEGATIVE, default=2.0, help="CFG scale w in (1+w)ε(x,c) − wε(x,∅)")


def _eval_settings(args: argparse.Namespace, seed: int = 0):
    from .diffusion.ddpm import EvalSettings

    return EvalSettings(args.per_class, args.sampler, args.sampling_steps, args.guidance, seed)


def _shipped_default(args: argparse.Namespace, attr: str, what: str, description: str) -> str:
    """``args.<attr>``, or the checkpoint shipped for ``args.data`` (digits, mnist5k)."""
    from .diffusion.models import shipped
    from .diffusion.runtime.errors import UsageError

    value = getattr(args, attr)
    if value is None:
        value = shipped(args.data, what)
        if value is None:
            raise UsageError(f"--{attr.replace('_', '-')} is required for {args.data} ({description})")
    return value


@command("demo", "forget one digit with EraseDiff and the baselines on scikit-learn's digits; write a report")
def _demo(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("--data", default="digits", help="digits (default) or mnist5k (28×28, 500 per class)")
    p.add_argument("--forget-class", type=INDEX, default=0, help="digit to forget (default 0)")
    p.add_argument("--seed", type=SEED, default=0, help="first seed (unlearning and evaluation)")
    p.add_argument(
        "--seeds", type=COUNT, default=1, help="number of seeds; with ≥ 2, means ± 95%% intervals (default 1)"
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default %(default)s)")
    p.add_argument(
        "--methods",
        default="finetune,neggrad,moo,salun,sa",
        help="comma-separated runs beside EraseDiff (finetune, neggrad, moo, moo_matched, salun, sa, "
        "erasediff_shared_adam), or 'none' (default: finetune,neggrad,moo,salun,sa)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=METHOD[:KEY=VALUE,...]",
        help="an extra run of METHOD with its own settings, e.g. moo_w3=moo:forget_weight=3 (repeatable)",
    )
    p.add_argument(
        "--steps", type=COUNT, default=300, help="unlearning steps per method (default %(default)s)"
    )
    p.add_argument("--batch-size", type=COUNT, default=64, help="retain and forget batch size")
    p.add_argument(
        "--published-budgets",
        action="store_true",
        help="each method at its published steps × batch (EraseDiff 300×128, SalUn 1000×128, SA 20000×128)",
    )
    p.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="LABEL=STEPSxBATCH",
        help="steps × batch size for one run, e.g. sa=2000x128 (repeatable)",
    )
    p.add_argument("--lr", type=POSITIVE, default=1e-4, help="Adam learning rate of every method")
    p.add_argument(
        "--forget-target",
        choices=("rl", "noise"),
        default="rl",
        help="EraseDiff/MOO ε_f: rl = ε_θ(x_t|c_m), c_m ≠ c_f; noise = U(0, I)",
    )
    p.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="override a method default, e.g. erasediff.eta=0.5, sa.samples_per_class=500 (repeatable)",
    )
    p.add_argument(
        "--resume", action="store_true", help="reuse finished methods and resume an interrupted one"
    )
    p.add_argument(
        "--train-base",
        action="store_true",
        help="train the base DDPM and classifier with the seeded script (cached) instead of the shipped ones",
    )
    p.add_argument("--checkpoint", help="base UNet checkpoint (default: the shipped one)")
    p.add_argument("--classifier", help="evaluation classifier (default: the shipped one)")
    p.add_argument(
        "--retrain",
        help="Retrain reference checkpoint (default: shipped for class 0, else trained with the base recipe)",
    )
    p.add_argument("--no-retrain", action="store_true", help="no Retrain row")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        help="bootstrap rounds over evaluation samples for 95%% intervals (default 0: none)",
    )
    p.add_argument("--cache-dir", help="default $XDG_CACHE_HOME/constrained_opt")
    p.add_argument(
        "--attacks",
        action="store_true",
        help="also attack every model (inversion, mixture, relearning, benign fine-tuning; minutes each)",
    )
    _add_eval(p)
    _add_common(p)

    def run(args: argparse.Namespace) -> None:
        from .diffusion.ddpm import demo
        from .diffusion.report import gap_table, metrics_table

        methods = (
            () if args.methods.strip() in ("", "none") else tuple(m.strip() for m in args.methods.split(","))
        )
        results = demo(
            data=args.data,
            forget_class=args.forget_class,
            seed=args.seed,
            seeds=args.seeds,
            out=args.out,
            methods=methods,
            variants=tuple(args.variant),
            steps=args.steps,
            batch_size=args.batch_size,
            published_budgets=args.published_budgets,
            budgets=tuple(args.budget),
            bootstrap=args.bootstrap,
            retrain=False if args.no_retrain else (args.retrain or True),
            lr=args.lr,
            forget_target=args.forget_target,
            hp=tuple(args.hp),
            es=_eval_settings(args, args.seed),
            device=args.device,
            resume=args.resume,
            train=args.train_base,
            checkpoint=args.checkpoint,
            classifier=args.classifier,
            cache=args.cache_dir,
            attacks=args.attacks,
            progress=not args.quiet,
        )
        print(metrics_table(results))
        print(gap_table(results))
        print(
            f"wrote {args.out}/report.md, metrics.json, table.md, noise_floor.json, samples_*.png"
            + (", fig2_cosines.png" if "moo" in results else "")
        )

    return run


@command("train-base", "train the base class-conditional DDPM and/or the evaluation classifier (seeded)")
def _train_base(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("--data", default="digits", help="digits | mnist5k | cifar10:PATH | imagefolder:PATH")
    p.add_argument(
        "--what", choices=("unet", "classifier", "both"), help="default both (unet with --exclude-class)"
    )
    p.add_argument(
        "--exclude-class",
        type=INDEX,
        help="train the UNet without this class (the Retrain reference), same seeded recipe",
    )
    p.add_argument("--steps", type=COUNT, default=3000, help="UNet training steps (default %(default)s)")
    p.add_argument("--classifier-steps", type=COUNT, default=1500, help="classifier training steps")
    p.add_argument("--batch-size", type=COUNT, default=128, help="training batch size")
    p.add_argument("--lr", type=POSITIVE, default=1e-3, help="UNet Adam learning rate (default %(default)s)")
    p.add_argument(
        "--preset", help="UNet preset: digits, mnist, cifar10 (the paper's), tiny (default: by dataset)"
    )
    p.add_argument("--image-size", type=COUNT, default=32, help="imagefolder resize (default %(default)s)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of initialisation and batches")
    p.add_argument("--out", help="output directory (default runs/base-<dataset>)")
    _add_common(p)

    def run(args: argparse.Namespace) -> None:
        from .diffusion.ddpm import train_base

        kind = args.data.partition(":")[0]
        out = args.out or (
            f"runs/base-{kind}"
            if args.exclude_class is None
            else f"runs/retrain-{kind}-c{args.exclude_class}"
        )
        written = train_base(
            args.data,
            out,
            what=args.what or ("both" if args.exclude_class is None else "unet"),
            exclude_class=args.exclude_class,
            unet_steps=args.steps,
            classifier_steps=args.classifier_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            preset=args.preset,
            seed=args.seed,
            image_size=args.image_size,
            device=args.device,
            progress=not args.quiet,
        )
        for path in written.values():
            print(f"wrote {path}")

    return run


@command("unlearn", "scrub a class or concept from a trained diffusion model")
def _unlearn(p: argparse.ArgumentParser) -> Runner:
    sub = p.add_subparsers(dest="target", required=True, metavar="{" + ",".join(UNLEARN_TARGETS) + "}")
    runners = {}
    for name, (help_text, builder) in UNLEARN_TARGETS.items():
        runners[name] = builder(sub.add_parser(name, help=help_text, description=help_text))
    return lambda args: runners[args.target](args)


@unlearn_target("ddpm", "class unlearning of a class-conditional DDPM (UNet2DModel)")
def _unlearn_ddpm(p: argparse.ArgumentParser) -> Runner:
    from .diffusion.baselines import METHODS

    p.add_argument("--method", required=True, choices=tuple(METHODS))
    p.add_argument(
        "--forget-class",
        type=class_list,
        required=True,
        help="class index to forget, or several separated by commas (e.g. 0,3): the union is forgotten",
    )
    p.add_argument(
        "--per-class-constraints",
        action="store_true",
        help="erasediff with several forget classes: one constraint per class instead of one pooled",
    )
    p.add_argument("--data", default="digits", help="digits | mnist5k | cifar10:PATH | imagefolder:PATH")
    p.add_argument("--checkpoint", help="base UNet checkpoint (default for digits: the shipped one)")
    p.add_argument(
        "--classifier", help="evaluation classifier; when given (or digits), metrics.json is written"
    )
    p.add_argument("--no-eval", action="store_true", help="skip evaluation")
    p.add_argument("--steps", type=COUNT, default=300, help="unlearning steps")
    p.add_argument(
        "--batch-size", type=COUNT, help="default 64 (digits, mnist5k), 128 otherwise (the paper's)"
    )
    p.add_argument("--lr", type=POSITIVE, default=1e-4, help="Adam learning rate")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the batches, the method and the sampling")
    p.add_argument("--forget-target", choices=("rl", "noise"), help="EraseDiff/MOO ε_f (default rl)")
    p.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method hyperparameter, e.g. eta=0.5, inner_steps=2, alpha=0.01 (repeatable)",
    )
    p.add_argument("--image-size", type=COUNT, default=32, help="imagefolder resize (default %(default)s)")
    p.add_argument("--out", help="output directory (default runs/unlearn-<method>-c<class>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    _add_eval(p)
    _add_common(p)

    def run(args: argparse.Namespace) -> None:
        from .diffusion.baselines import parse_hparams
        from .diffusion.ddpm import UnlearnJob, unlearn_ddpm
        from .diffusion.runtime.errors import UsageError

        classes = args.forget_class
        forget_class = classes[0] if len(classes) == 1 else classes
        method = args.method
        if args.per_class_constraints:
            if args.method != "erasediff" or len(classes) < 2:
                raise UsageError(
                    "--per-class-constraints needs --method erasediff and at least two forget classes "
                    f"(got --method {args.method} --forget-class {','.join(map(str, classes))})"
                )
            method = "erasediff_per_class"
        pairs = [*args.hp, *([f"forget_target={args.forget_target}"] if args.forget_target else [])]
        hparams = parse_hparams(args.method, pairs)
        checkpoint = _shipped_default(args, "checkpoint", "unet", "the base model")
        classifier = (
            None
            if args.no_eval or (args.classifier is None and args.data not in ("digits", "mnist5k"))
            else (_shipped_default(args, "classifier", "classifier", "the evaluation classifier"))
        )
        batch_size = args.batch_size or (64 if args.data in ("digits", "mnist5k") else 128)
        out = args.out or f"runs/unlearn-{method}-c{'-'.join(map(str, classes))}"
        job = UnlearnJob(method, forget_class, args.steps, batch_size, args.lr, args.seed, hparams)
        record = unlearn_ddpm(
            args.data,
            checkpoint,
            out,
            job,
            classifier=classifier,
            es=_eval_settings(args, args.seed),
            image_size=args.image_size,
            device=args.device,
            resume=args.resume,
            progress=not args.quiet,
        )
        print(", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
        print(f"wrote {out}/model.safetensors")

    return run


@command("evaluate", "evaluate UNet checkpoints side by side (P(y=c_f|x_f), accuracy, FID, precision/recall)")
def _evaluate(p: argparse.ArgumentParser) -> Runner:
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a checkpoint to evaluate (repeatable; the first is the reference, e.g. base=...)",
    )
    p.add_argument("--forget-class", type=INDEX, required=True, help="the forgotten class index")
    p.add_argument("--data", default="digits", help="digits | mnist5k | cifar10:PATH | imagefolder:PATH")
    p.add_argument("--classifier", help="evaluation classifier (default for digits: the shipped one)")
    p.add_argument("--inception-weights", help="torch-fidelity Inception-v3 weights: adds Inception FID")
    p.add_argument("--image-size", type=COUNT, default=32, help="imagefolder resize")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the initial noise x_T")
    p.add_argument("--out", default="runs/evaluate", help="output directory")
    _add_eval(p)
    _add_common(p)

    def run(args: argparse.Namespace) -> None:
        from .diffusion.ddpm import evaluate_checkpoints
        from .diffusion.report import metrics_table
        from .diffusion.runtime.errors import UsageError

        models = {}
        for spec in args.model:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise UsageError(f"--model expects NAME=PATH, got {spec!r}")
            models[name] = path
        classifier = _shipped_default(args, "classifier", "classifier", "the evaluation classifier")
        results = evaluate_checkpoints(
            args.data,
            models,
            classifier,
            args.forget_class,
            args.out,
            _eval_settings(args, args.seed),
            image_size=args.image_size,
            device=args.device,
            inception=args.inception_weights,
            progress=not args.quiet,
        )
        print(metrics_table(results))
        print(f"wrote {args.out}/report.md, metrics.json")

    return run


from .diffusion.cli import sd as _sd_cli  # noqa: E402

unlearn_target("sd", _sd_cli.UNLEARN_HELP)(_sd_cli.build_unlearn)  # `unlearn sd`
command("sd", _sd_cli.COMMAND_HELP)(_sd_cli.build_sd)  # `sd {generate,nudenet,ua,...}`
from .diffusion.attacks_cli import register as _register_attacks  # noqa: E402

_register_attacks(command, _add_common)  # `attack {ddpm,sd}`


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="constrained-opt", description="EraseDiff unlearning for diffusion models (docs/ddpm.md)"
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}", parser_class=_Parser
    )
    for name, (help_text, builder) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(run=builder(sub_parser))
    return parser


def _optimizer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the optimizer refusing a step or a setting: a :class:`ClosureError` or
    :class:`UpdateError`, or a ``ValueError`` raised inside the optimizer's modules (optimizer,
    functional, rules, _flat)."""
    from . import optimizer

    if isinstance(exc, optimizer.ClosureError | optimizer.UpdateError):
        return True
    if not isinstance(exc, ValueError) or exc.__traceback__ is None:
        return False
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = os.path.abspath(tb.tb_frame.f_code.co_filename)
    core = os.path.dirname(os.path.abspath(optimizer.__file__))
    return os.path.dirname(where) == core and os.path.basename(where) in _OPTIMIZER_MODULES


_OPTIMIZER_MODULES = ("optimizer.py", "functional.py", "rules.py", "_flat.py")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Called with ``argv=None`` (the ``constrained-opt`` process itself), it also
    picks torch's thread count from the CPUs that are free (:mod:`constrained_opt.threads`)."""
    from .diffusion.runtime.errors import UsageError

    args = build_parser().parse_args(argv)
    if argv is None:
        from .threads import configure_threads

        note = configure_threads()
        if note:
            print(f"constrained-opt: {note}", file=sys.stderr)
    try:
        args.run(args)
    except UsageError as e:
        print(f"constrained-opt: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if not _optimizer_failure(e):
            raise
        reason = " ".join(str(e).split())
        print(
            f"constrained-opt: error: the optimizer stopped the run: {reason}. Lower --lr or the method's "
            "step sizes (--hp inner_lr=..., eta=...) and run it again without --resume",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("constrained-opt: interrupted; run the same command with --resume to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
