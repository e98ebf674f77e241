"""``python -m benchmarks [--only ITEM ...] [--smoke] [--device DEV]``.

Writes ``benchmarks/results/<item>.json`` and regenerates ``docs/benchmarks.md`` with PNG plots in
``docs/img/`` from every result file present. ``--smoke`` runs tiny sizes (what CI runs) and writes
under ``--out`` only, leaving the committed results and docs alone.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from .common import RESULTS, write_result

ITEMS = (
    "step_overhead",
    "robust_overhead",
    "projection",
    "memory",
    "unlearning",
    "sa_budget",
    "multi_constraint",
    "torchjd_compare",
    "cooper_compare",
    "authors_step",
    "ddpm_multiclass",
    "comparison",
    "ablation",
    "comparison_mnist5k",
    "sa_tuning",
    "salun_transferred",
    "sa_tuned",
    "release_loop",
    "sa_fisher",
    "robustness",
    "robustness_published",
    "deep_erasure_digits",
    "deep_erasure_mnist5k",
    "deep_sweep_digits",
)
SLOW = (
    "unlearning",  # its earlier result measured the superseded SalUn/SA; not rerun (CPU hours)
    "sa_budget",
    "ddpm_multiclass",
    "comparison",
    "ablation",
    "comparison_mnist5k",
    "sa_tuning",
    "salun_transferred",
    "sa_tuned",
    "release_loop",
    "robustness",
    "robustness_published",
    "deep_erasure_digits",
    "deep_erasure_mnist5k",
    "deep_sweep_digits",
)
DEFAULT = tuple(item for item in ITEMS if item not in SLOW)
# items sharing a module
MODULE = {
    "ablation": "comparison",
    "comparison_mnist5k": "comparison",
    "sa_tuning": "comparison",
    "salun_transferred": "comparison",
    "sa_tuned": "comparison",
    "release_loop": "comparison",
    "robustness_published": "robustness",
    "deep_erasure_digits": "deep_erasure",
    "deep_erasure_mnist5k": "deep_erasure",
    "deep_sweep_digits": "deep_erasure",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        nargs="+",
        choices=ITEMS,
        default=list(DEFAULT),
        help="default: all but " + ", ".join(SLOW) + " (each takes from 10 minutes to hours on a CPU)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; no docs update")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=RESULTS, help="folder for the JSON results")
    parser.add_argument("--no-docs", action="store_true", help="write no doc (benchmarks.md, items' pages)")
    parser.add_argument(
        "--rounds", type=int, help="step_overhead, robust_overhead: repetitions per configuration"
    )
    parser.add_argument(
        "--cifar-ks",
        type=int,
        nargs="+",
        help="step_overhead: K values for the 35.7M model; robust_overhead: run it, for these K",
    )
    parser.add_argument(
        "--against", help="step_overhead: also time the optimizer of this git revision, in the same rounds"
    )
    parser.add_argument(
        "--work",
        help="comparison and deep_erasure items: folder for the demo outputs (models, samples, attacks; "
        "resumable; default runs/benchmarks); robustness: models and per-run results (default "
        "runs/benchmarks/robustness)",
    )
    parser.add_argument(
        "--hp",
        nargs="+",
        default=(),
        metavar="LABEL.KEY=VALUE",
        help="deep_erasure items: override a row's hyperparameter (the demo's --hp)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        help="robustness items: attack these demo output folders' models "
        "(robustness_published: default runs/benchmarks/comparison)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    suffix = f"_{device.type}" if device.type != "cpu" else ""
    for item in args.only:
        module = importlib.import_module(f".{MODULE.get(item, item)}", __package__)
        extra = (
            {"rounds": args.rounds, "cifar_ks": args.cifar_ks, "against": args.against}
            if item == "step_overhead"
            else {}
        )
        if item == "robust_overhead":
            extra = {"rounds": args.rounds, "cifar_ks": args.cifar_ks}
        if module.__name__.endswith(".comparison"):
            extra = {"config": item, "work": args.work or "runs/benchmarks"}
        if module.__name__.endswith(".deep_erasure"):
            extra = {"config": item, "work": args.work or "runs/benchmarks", "hp": tuple(args.hp)}
        if item == "robustness":
            extra = {"work": args.work or "runs/benchmarks/robustness", "models": args.models}
        if item == "robustness_published":  # the comparison item's models (run it first)
            models = args.models or [module.PUBLISHED_MODELS]
            extra = {"work": args.work or "runs/benchmarks/robustness_published", "models": models}
        payload = module.run(device, args.smoke, **extra)
        command = " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])])
        meta = {"device": str(device), "smoke": args.smoke, "command": command}
        path = write_result(item + suffix, {**meta, **payload}, args.out)
        print(f"wrote {path}")
        if hasattr(module, "update_doc") and not (args.smoke or args.no_docs):
            module.update_doc(payload, command, item)  # its own block of its own page (docs/robustness.md)
    if not (args.smoke or args.no_docs):
        from .report import write_docs

        print(f"wrote {write_docs(args.out)}")


if __name__ == "__main__":
    main()
