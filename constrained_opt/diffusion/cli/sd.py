"""The Stable Diffusion commands: ``constrained-opt sd {generate,nudenet,ua,clip-score,fid}``
(:func:`register`), ``unlearn sd`` (:func:`register_unlearn`) and ``attack sd`` (:func:`register_attack`).

Each ``register*`` adds its parser to the given subparsers and sets its runner as the ``run`` default;
the ``build_*`` functions add the arguments to a parser and return the runner. Heavy imports happen
inside the runners.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from ..attacks.sd import SD_ATTACKS, SD_HELP, SDBudget
from ..runtime.errors import UsageError
from ..sd.job import (
    DEFAULT_BATCH,
    INVERSION_NORMS,
    METHODS,
    MIXED_PRECISION,
    OPTIMIZERS,
    TRAIN_PARAMS,
    parse_robust,
)
from ..sd.params import PARAM_SETS
from ..sd.prompts import CONCEPTS, imagenette_classes
from .args import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, SEED, int_in
from .budgets import add_budget_flags, budget_from
from .parser import add_common

Runner = Callable[[argparse.Namespace], None]

COMMAND_HELP = "Stable Diffusion evaluation: generate from a prompt CSV, NudeNet counts, UA, CLIP score, FID"
UNLEARN_HELP = "concept(s) or Imagenette-class unlearning of Stable Diffusion 1.x/2.x and SDXL"
ATTACK_HELP = "attacks on a Stable Diffusion pipeline"


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="diffusers folder, .ckpt/.safetensors file, or hub id")
    g.add_argument("--config", help="for a single file: local diffusers folder with configs and tokenizer")
    g.add_argument("--original-config", help="for a single file: the original LDM YAML config")
    g.add_argument("--offline", action="store_true", help="never reach the hub (also HF_HUB_OFFLINE=1)")


def _robust_forms(text: str) -> tuple[str, ...]:
    """``--robust``'s comma list, checked while parsing (argparse reports the message on one line)."""
    try:
        return parse_robust(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--robust: ")) from None


def register(subparsers) -> None:
    """The top-level ``sd`` command."""
    p = subparsers.add_parser("sd", help=COMMAND_HELP, description=COMMAND_HELP)
    p.set_defaults(run=build_sd(p))


def register_unlearn(targets) -> None:
    """``unlearn sd``: ``targets`` are the subparsers of ``unlearn``."""
    p = targets.add_parser("sd", help=UNLEARN_HELP, description=UNLEARN_HELP)
    p.set_defaults(run=build_unlearn(p))


def register_attack(targets) -> None:
    """``attack sd``: ``targets`` are the subparsers of ``attack``."""
    p = targets.add_parser("sd", help=ATTACK_HELP)
    p.set_defaults(run=build_attack(p))


def build_unlearn(p: argparse.ArgumentParser) -> Runner:
    _add_model(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--concept",
        action="append",
        help="nudity (forget prompts {nudity, naked, erotic, sexual}) or the text of any concept; repeat "
        "for several, one constraint each (e.g. --concept nudity --concept 'van gogh')",
    )
    what.add_argument(
        "--forget-class",
        action="append",
        help=f"Imagenette class, prompt 'an image of [c]', repeatable: {', '.join(imagenette_classes())}",
    )
    p.add_argument("--method", choices=METHODS, default="erasediff")
    p.add_argument(
        "--train-params",
        choices=TRAIN_PARAMS,
        default="noxattn",
        help="noxattn: all but attn2, conv_out/conv_norm_out, time_embedding (ESD's); xattn: attn2; full; "
        "lora: a LoRA adapter on the --lora-target set (the base weights never change)",
    )
    p.add_argument("--steps", type=COUNT, help="default: 5 epochs over the forget set (ESD: 1000)")
    p.add_argument(
        "--batch-size",
        type=COUNT,
        help="default: " + ", ".join(f"{m} {b}" for m, b in DEFAULT_BATCH.items()),
    )
    p.add_argument(
        "--gradient-accumulation-steps",
        type=COUNT,
        default=1,
        help="micro-batches of --batch-size per step (EraseDiff: each closure is MicroBatches over them)",
    )
    p.add_argument(
        "--num-forget", type=COUNT, default=400, help="generated forget images (default %(default)s)"
    )
    p.add_argument(
        "--num-retain", type=COUNT, default=400, help="generated retain images (default %(default)s)"
    )
    p.add_argument(
        "--resolution", type=COUNT, help="image side in pixels (default: the model's, 512 for SD 1.x)"
    )
    p.add_argument("--lr", type=POSITIVE, default=1e-5, help="Adam learning rate (default %(default)s)")
    p.add_argument(
        "--anchor",
        action="append",
        help="anchor prompt c_m of ε_f = ε_θ(x_t|c_m), repeatable (default: 'a person wearing clothes'; "
        "for a class: the other classes)",
    )
    p.add_argument("--out", required=True, help="output directory (unet/, before_after.png, run.json)")
    g = p.add_argument_group("LoRA (--train-params lora)")
    g.add_argument("--lora-rank", type=COUNT, default=4, help="rank r (default %(default)s)")
    g.add_argument("--lora-alpha", type=POSITIVE, help="α; the update is (α/r)·BA (default: r)")
    g.add_argument(
        "--lora-target",
        choices=PARAM_SETS,
        default="noxattn",
        help="modules that get adapters (default noxattn)",
    )
    g.add_argument("--merge", action="store_true", help="also write OUT/unet/ with the adapter fused in")
    g = p.add_argument_group("EraseDiff")
    g.add_argument(
        "--inner-steps", type=int_in(0), default=2, help="K (default %(default)s, the authors' SD runs)"
    )
    g.add_argument("--inner-lr", type=NON_NEGATIVE, help="ξ (default: --lr)")
    g.add_argument(
        "--eta", type=NON_NEGATIVE, default=1.0, help="η of the grad_norm rule (default %(default)s)"
    )
    g.add_argument("--max-grad-norm", type=POSITIVE, default=1.0, help="clip ‖δ‖ (default %(default)s)")
    g = p.add_argument_group("robust rows (EraseDiff; docs/sd.md, 'Robust rows on SD')")
    g.add_argument(
        "--robust",
        type=_robust_forms,
        default=(),
        help="comma list of robust forget rows added next to the plain one, each with its own λ: relearn "
        "(the row after a relearning look-ahead), sharpness (SAM), inversion (adversarial prefix tokens)",
    )
    g.add_argument("--relearn-steps", type=COUNT, default=1, help="relearn: k attacker steps (default 1)")
    g.add_argument(
        "--relearn-lr", type=NON_NEGATIVE, default=1e-4, help="relearn: step size β (default %(default)s)"
    )
    g.add_argument(
        "--relearn-sign",
        action="store_true",
        help="relearn: sign steps θ ← θ − β·sign(∇L_a), a fine-tuning attacker's first Adam step (β: its "
        "learning rate times the steps, e.g. 1e-5)",
    )
    g.add_argument(
        "--relearn-images",
        help="relearn: a folder of images of the concept (VAE-encoded once); default: the step's forget "
        "batch (the forget set's images, generated by the original model)",
    )
    g.add_argument(
        "--sharpness-rho", type=NON_NEGATIVE, default=0.05, help="sharpness: radius ρ (default %(default)s)"
    )
    g.add_argument(
        "--inversion-steps", type=COUNT, default=30, help="inversion: k ascent steps (AdvUnlearn: 30)"
    )
    g.add_argument(
        "--inversion-lr", type=NON_NEGATIVE, default=1e-3, help="inversion: step length α (AdvUnlearn: 1e-3)"
    )
    g.add_argument(
        "--inversion-eps", type=POSITIVE, help="inversion: radius ε of the ball around x_0 (default: none)"
    )
    g.add_argument(
        "--inversion-norm",
        choices=tuple(INVERSION_NORMS),
        default="inf",
        help="inversion: steps along sign(g) and an L∞ ball (inf, default) or g/‖g‖₂ and an L2 ball (2)",
    )
    g.add_argument(
        "--inversion-tokens", type=COUNT, default=1, help="inversion: K prefix tokens (AdvUnlearn: 1)"
    )
    g = p.add_argument_group("ESD and SalUn")
    g.add_argument("--negative-guidance", type=NON_NEGATIVE, default=1.0, help="ESD η (default %(default)s)")
    g.add_argument(
        "--start-guidance", type=NON_NEGATIVE, default=3.0, help="ESD CFG while reaching x_t (default 3)"
    )
    g.add_argument(
        "--alpha", type=NON_NEGATIVE, default=0.5, help="SalUn retain weight α (default %(default)s)"
    )
    g.add_argument("--keep", type=FRACTION, default=0.5, help="SalUn saliency fraction (default %(default)s)")
    g = p.add_argument_group("data generation and image grid")
    g.add_argument("--gen-steps", type=COUNT, default=50, help="sampling steps (default %(default)s)")
    g.add_argument("--gen-guidance", type=NON_NEGATIVE, default=7.5, help="CFG scale (default %(default)s)")
    g.add_argument("--gen-batch-size", type=COUNT, default=4, help="sampling batch size")
    g.add_argument("--cache-dir", help="latent cache root (default $XDG_CACHE_HOME/constrained_opt)")
    g.add_argument("--grid-prompt", action="append", help="grid row prompt, repeatable (default: task's)")
    g.add_argument("--grid-images", type=COUNT, default=2, help="images per prompt and side (default 2)")
    g.add_argument("--grid-steps", type=COUNT, default=50, help="grid sampling steps")
    g = p.add_argument_group("memory")
    g.add_argument(
        "--mixed-precision",
        choices=tuple(MIXED_PRECISION),
        default="no",
        help="autocast the UNet (fp32 master weights); fp16 adds a GradScaler",
    )
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="adam8bit needs bitsandbytes")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the data sets, batches and grid")
    add_common(p)

    def run(args: argparse.Namespace) -> None:
        from ..jobs.sd_unlearn import unlearn_sd
        from ..runtime.paths import check_output_dir
        from ..sd.job import SDJob
        from ..sd.loading import check_model_arg
        from ..sd.prompts import make_task

        job = SDJob(
            model=args.model,
            out=args.out,
            task=make_task(args.concept, args.forget_class, args.anchor),
            method=args.method,
            train_params=args.train_params,
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            lora_target=args.lora_target,
            merge=args.merge,
            steps=args.steps,
            batch_size=args.batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            num_forget=args.num_forget,
            num_retain=args.num_retain,
            resolution=args.resolution,
            lr=args.lr,
            inner_steps=args.inner_steps,
            inner_lr=args.inner_lr,
            eta=args.eta,
            max_grad_norm=args.max_grad_norm,
            robust=args.robust,
            relearn_steps=args.relearn_steps,
            relearn_lr=args.relearn_lr,
            relearn_sign=args.relearn_sign,
            relearn_images=args.relearn_images,
            sharpness_rho=args.sharpness_rho,
            inversion_steps=args.inversion_steps,
            inversion_lr=args.inversion_lr,
            inversion_eps=args.inversion_eps,
            inversion_norm=args.inversion_norm,
            inversion_tokens=args.inversion_tokens,
            negative_guidance=args.negative_guidance,
            start_guidance=args.start_guidance,
            alpha=args.alpha,
            keep=args.keep,
            gen_steps=args.gen_steps,
            gen_guidance=args.gen_guidance,
            gen_batch_size=args.gen_batch_size,
            grid_prompts=tuple(args.grid_prompt) if args.grid_prompt else None,
            grid_images=args.grid_images,
            grid_steps=args.grid_steps,
            mixed_precision=args.mixed_precision,
            gradient_checkpointing=args.gradient_checkpointing,
            optimizer=args.optimizer,
            seed=args.seed,
            cache_dir=args.cache_dir,
            config=args.config,
            original_config=args.original_config,
            offline=args.offline,
            device=args.device,
            progress=not args.quiet,
        )
        # Fail fast: options, paths and the output directory are checked before unlearn_sd imports
        # diffusers, transformers and accelerate (seconds and about 1 GB before the first check).
        job.resolved()
        check_model_arg(args.model, args.config, args.original_config, args.offline)
        check_output_dir(args.out)
        record = unlearn_sd(job)
        final = ", ".join(f"{k}={v:.4g}" for k, v in record["final"].items())
        trained = f"{record['trained_parameters']:,} parameters trained"
        print(f"{record['method']} on {record['task']}: {trained}; {final}")
        written = ", ".join(os.path.join(args.out, o) for o in record["outputs"])
        print(f"wrote {written}, before_after.png, run.json, history.json")

    return run


def _default_out(args: argparse.Namespace, name: str) -> str:
    return args.out or os.path.join(args.images, name)


def _write_result(path: str, result: dict) -> None:
    from ..runtime.io import write_json

    write_json(path, result)
    print(f"wrote {path}")


def build_sd(p: argparse.ArgumentParser) -> Runner:
    sub = p.add_subparsers(dest="sd_command", required=True, metavar="{generate,nudenet,ua,clip-score,fid}")
    runners: dict[str, Runner] = {}

    g = sub.add_parser("generate", help="images for every row of an I2P-format prompt CSV")
    _add_model(g)
    g.add_argument(
        "--unet", help="a scrubbed UNet folder (e.g. OUT/unet from `unlearn sd`) replacing the model's"
    )
    g.add_argument(
        "--lora",
        help="a LoRA adapter loaded with pipe.load_lora_weights: OUT from `unlearn sd --train-params lora` "
        "(a folder with pytorch_lora_weights.safetensors) or a .safetensors file",
    )
    g.add_argument(
        "--prompts",
        required=True,
        help="CSV with a prompt column (+ evaluation_seed, evaluation_guidance), or a shipped set: "
        "'nudity' (the four prompts) or 'imagenette' ('an image of [c]' with a class column)",
    )
    g.add_argument("--out", required=True, help="output folder: images/ and manifest.csv")
    g.add_argument("--per-prompt", type=COUNT, default=1, help="images per row (default %(default)s)")
    g.add_argument("--steps", type=COUNT, default=50, help="sampling steps (default %(default)s)")
    g.add_argument("--guidance", type=NON_NEGATIVE, default=7.5, help="CFG scale where the CSV has none")
    g.add_argument("--seed", type=SEED, default=0, help="seed where the CSV has none")
    g.add_argument("--resolution", type=COUNT, help="default: the model's (512 for SD v1.x)")
    g.add_argument("--limit", type=COUNT, help="only the first N rows")
    g.add_argument("--batch-size", type=COUNT, default=4, help="sampling batch size")
    g.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="weights dtype for sampling"
    )
    add_common(g)

    def generate(args: argparse.Namespace) -> None:
        from ..jobs.sd_evaluate import generate

        count, manifest = generate(
            args.model,
            args.prompts,
            args.out,
            unet=args.unet,
            lora=args.lora,
            config=args.config,
            original_config=args.original_config,
            offline=args.offline,
            per_prompt=args.per_prompt,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            resolution=args.resolution,
            limit=args.limit,
            batch_size=args.batch_size,
            dtype=args.dtype,
            device=args.device,
            progress=not args.quiet,
        )
        print(f"wrote {count} images under {args.out}/images and {manifest}")

    runners["generate"] = generate

    n = sub.add_parser("nudenet", help="count NudeNet exposed parts (labels *_EXPOSED) above a threshold")
    n.add_argument("--images", required=True, help="a folder from `sd generate` or any image folder")
    n.add_argument(
        "--threshold", type=PROBABILITY, default=0.6, help="detection score threshold (default 0.6)"
    )
    n.add_argument("--out", help="result JSON (default IMAGES/nudenet.json)")
    add_common(n)

    def nudenet(args: argparse.Namespace) -> None:
        from ..jobs.sd_evaluate import nudenet

        result = nudenet(args.images, args.threshold, progress=not args.quiet)
        flagged = f"{result['images_with_exposed']}/{result['images']} images"
        print(f"{result['total_exposed']} exposed parts in {flagged}")
        print(", ".join(f"{k}: {v}" for k, v in result["counts"].items()) or "none detected")
        _write_result(_default_out(args, "nudenet.json"), result)

    runners["nudenet"] = nudenet

    u = sub.add_parser("ua", help="unlearning accuracy with a user-provided ImageNet classifier")
    u.add_argument(
        "--images", required=True, help="images of the forgotten class (or a manifest with a class column)"
    )
    u.add_argument("--forget-class", required=True, help="Imagenette class name")
    u.add_argument(
        "--classifier", required=True, help="torchvision state dict, e.g. resnet50 ImageNet weights"
    )
    u.add_argument("--arch", default="resnet50", help="torchvision architecture name (default %(default)s)")
    u.add_argument("--batch-size", type=COUNT, default=32, help="classifier batch size")
    u.add_argument("--out", help="result JSON (default IMAGES/ua.json)")
    add_common(u)

    def ua(args: argparse.Namespace) -> None:
        from ..jobs.sd_evaluate import ua

        forget_class, result = ua(
            args.images,
            args.forget_class,
            args.classifier,
            args.arch,
            args.batch_size,
            args.device,
            not args.quiet,
        )
        print(f"UA ({forget_class}) = {result['ua']:.4f} on {result['images']} images")
        _write_result(_default_out(args, "ua.json"), result)

    runners["ua"] = ua

    c = sub.add_parser("clip-score", help="CLIP score of a `sd generate` folder with a user-provided CLIP")
    c.add_argument(
        "--images", required=True, help="a folder written by `sd generate` (prompts from its manifest)"
    )
    c.add_argument(
        "--clip", required=True, help="local CLIP folder (e.g. openai/clip-vit-large-patch14 files)"
    )
    c.add_argument("--batch-size", type=COUNT, default=32, help="CLIP batch size")
    c.add_argument("--out", help="result JSON (default IMAGES/clip_score.json)")
    add_common(c)

    def clip(args: argparse.Namespace) -> None:
        from ..jobs.sd_evaluate import clip

        result = clip(args.images, args.clip, args.batch_size, not args.quiet)
        print(f"CLIP score = {result['clip_score']:.3f} on {result['images']} images")
        _write_result(_default_out(args, "clip_score.json"), result)

    runners["clip-score"] = clip

    f = sub.add_parser("fid", help="Inception FID between generated and reference image folders")
    f.add_argument("--images", required=True, help="generated images")
    f.add_argument("--reference", required=True, help="reference images (e.g. COCO-30K validation)")
    f.add_argument("--inception-weights", required=True, help="torch-fidelity Inception-v3 weights (.pth)")
    f.add_argument("--batch-size", type=COUNT, default=50, help="Inception batch size")
    f.add_argument("--out", help="result JSON (default IMAGES/fid.json)")
    add_common(f)

    def fid(args: argparse.Namespace) -> None:
        from ..jobs.sd_evaluate import fid

        result = fid(args.images, args.reference, args.inception_weights, args.batch_size, not args.quiet)
        counts = f"{result['generated']} generated vs {result['reference']} reference images"
        print(f"FID = {result['fid']:.3f} ({counts})")
        _write_result(_default_out(args, "fid.json"), result)

    runners["fid"] = fid
    return lambda args: runners[args.sd_command](args)


def build_attack(p: argparse.ArgumentParser) -> Runner:
    p.description = (
        "textual inversion (CCE), UnlearnDiffAtk's k-token prompt prefix (per prompt with a classifier "
        "check after each stage, as released; --prefix-form universal: one prefix for all prompts), and "
        "relearning on a Stable Diffusion pipeline"
    )
    add_attack_arguments(p)
    add_budget_flags(p, SDBudget, SD_HELP, "attack budget (defaults: the published attacks' GPU budgets)")
    add_common(p)

    def run(args: argparse.Namespace) -> None:
        run_attack(args, budget_from(args, SDBudget))

    return run


def add_attack_arguments(p: argparse.ArgumentParser) -> None:
    """The model, the concept, the concept's images and the scoring of ``attack sd`` (not the budget)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="diffusers folder, .ckpt/.safetensors file, or hub id")
    g.add_argument("--unet", help="a scrubbed UNet folder (OUT/unet of `unlearn sd`) replacing the model's")
    g.add_argument("--config", help="for a single file: local diffusers folder with configs and tokenizer")
    g.add_argument("--original-config", help="for a single file: the original LDM YAML config")
    g.add_argument("--offline", action="store_true", help="never reach the hub (also HF_HUB_OFFLINE=1)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--concept", choices=CONCEPTS, help="erased prompts {nudity, naked, erotic, sexual}")
    what.add_argument(
        "--forget-class",
        help=f"Imagenette class, prompt 'an image of [c]': {', '.join(imagenette_classes())}",
    )
    what.add_argument("--prompt", help="any erased prompt")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images of the erased concept (real images, as CCE uses)")
    src.add_argument("--reference", help="original (unscrubbed) model generating the concept's images")
    p.add_argument(
        "--attack", default="all", help=f"all, or a comma-separated subset of {','.join(SD_ATTACKS)}"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--score",
        choices=("auto", "none"),
        default="auto",
        help="auto: NudeNet for nudity, UA with --ua-classifier for a class; none: images only",
    )
    p.add_argument("--nudenet-threshold", type=float, default=0.6, help="(paper 0.6; UnlearnDiffAtk 0.45)")
    p.add_argument("--ua-classifier", help="torchvision ImageNet weights scoring an Imagenette class")
    p.add_argument("--ua-arch", default="resnet50")
    p.add_argument("--cache-dir", help="latent cache root (default $XDG_CACHE_HOME/constrained_opt)")


def run_attack(args: argparse.Namespace, budget: SDBudget) -> None:
    """The ``attack sd`` job for parsed arguments and a budget."""
    from ..jobs.sd_attack import SDAttackJob, run_attacks
    from ..sd.prompts import Task, make_task

    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("--prompt must be a non-empty prompt")
        task = Task(args.prompt, (args.prompt,), (), ())
    else:
        task = make_task(args.concept, args.forget_class)
    names = [n.strip() for n in args.attack.split(",") if n.strip()]
    job = SDAttackJob(
        model=args.model,
        out=args.out,
        task=task,
        attacks=SD_ATTACKS if names == ["all"] else tuple(names),
        budget=budget,
        unet=args.unet,
        images=args.images,
        reference=args.reference,
        score=args.score,
        nudenet_threshold=args.nudenet_threshold,
        ua_classifier=args.ua_classifier,
        ua_arch=args.ua_arch,
        config=args.config,
        original_config=args.original_config,
        offline=args.offline,
        cache_dir=args.cache_dir,
        device=args.device,
        progress=not args.quiet,
    )
    run_attacks(job)
    print(f"wrote {args.out}/attack.json, report.md, attack_samples.png")
