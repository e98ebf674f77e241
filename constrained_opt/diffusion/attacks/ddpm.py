"""Attacks that try to bring an erased class back into a class-conditional DDPM.

The model is a diffusers ``UNet2DModel`` with ``num_class_embeds = C + 1`` (row C is the null class ∅
of classifier-free guidance). E ∈ R^{(C+1)×d} is its class-embedding table and
L(x_0, e) = E_{t,ε} ‖ε − ε_θ(x_t, t | e)‖² the denoising loss with the class embedding replaced by a
vector e. Every attack runs under one fixed :class:`Budget` (steps, learning rates, N, n, seed) shared
by all models, so the figures compare across unlearning methods.

1. **Concept inversion** (the DDPM analogue of textual inversion as used by Pham et al.'s concept
   inversion, NYU-DICE-Lab/circumventing-concept-erasure ``esd/concept_inversion.py``): one new vector
   e* = argmin_e E_{x_0 ∈ D_N} L(x_0, e) on N real images of c_f, θ frozen, e initialised at E_∅, Adam.
2. **Embedding mixture** (the analogue of UnlearnDiffAtk's relaxed-token search, OPTML-Group/
   Diffusion-MU-Attack ``src/attackers/text_grad_.py``): e = wᵀE with w on the simplex Δ^C (the null
   class included), minimising the same loss by projected Adam: w ← Π_Δ(w) after every step
   (Euclidean projection). w starts at the best of the uniform point (UnlearnDiffAtk's start) and
   the C + 1 vertices, see :func:`best_start`.
3. **Relearning**: all weights of a copy of θ fine-tuned m steps on n real images of c_f with the plain
   training loss L(x_0, E_{c_f}) (Adam, update norm clipped at 1 as in training); P(y = c_f) is probed
   every ``probe_every`` steps; reported: P at each probe, the first probed step where P ≥ 0.5 and the
   area under the probed curve, ``auc`` = (1/m)∫₀^m P ds (trapezoid rule; the mean P over the attack).
4. **Benign fine-tuning**: the same on the retained classes only (c_f is never shown); whether
   P(y = c_f) rises again.

Attacks 1–2 sample with the attacked vector in the conditional branch of classifier-free guidance,
ε̂ = (1 + w)ε(x_t | e) − wε(x_t | ∅), from the same x_T as the plain (``none``) evaluation of class c_f.
Reported per attack: ``p_forget`` = mean P_ψ(y = c_f | x) over the samples with a 95% percentile
bootstrap interval over samples (``p_forget_ci``), and ``entropy`` (nats) of P_ψ(y | x). The model under
attack is never modified: 1–2 swap the class-embedding module for the attack's duration and freeze
θ; 3–4 train a deep copy.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..data import BatchSampler, ImageData, check_class, split_forget
from ..evaluation.metrics import classifier_probs, forget_scores
from ..losses import class_table, denoising_loss, diffuse, unet_eps
from ..models import load_unet, null_class
from ..runtime.errors import UsageError
from ..runtime.io import read_json, write_json
from ..sampling import make_scheduler, sample
from .common import AppendedEmbedding, Budget, bootstrap_ci, loss_record, probe_auc, project_simplex
from .report import report_line, summary

ATTACKS = ("inversion", "mixture", "relearn", "benign")


RELEARN_THRESHOLD = 0.5


@contextlib.contextmanager
def attacked_embedding(unet, extra: Callable[[], Tensor]) -> Iterator[int]:
    """Within the block, class label ``index`` (yielded) conditions ``unet`` on ``extra()[0]``, and the
    UNet's own parameters are frozen (``requires_grad=False``); both are restored on exit."""
    table = class_table(unet)
    flags = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)
    unet.class_embedding = AppendedEmbedding(table, extra)
    try:
        yield table.num_embeddings
    finally:
        unet.class_embedding = table
        for p, flag in zip(unet.parameters(), flags, strict=True):
            p.requires_grad_(flag)


@dataclass
class Scorer:
    """Samples images for one class label and scores them with the evaluation classifier."""

    classifier: nn.Module
    forget_class: int
    budget: Budget
    progress: bool = True

    def images(self, unet, label: int, *, probe: bool = False, desc: str = "sampling") -> Tensor:
        b = self.budget
        n = b.probe_samples if probe else b.samples
        return sample(
            unet,
            torch.full((n,), label),
            num_steps=b.probe_sampling_steps if probe else b.sampling_steps,
            guidance=b.guidance,
            seed=b.seed,
            progress=self.progress and not probe,
            desc=desc,
        )

    def score(self, images: Tensor) -> dict[str, Any]:
        probs = classifier_probs(self.classifier, images)
        p_forget, entropy = forget_scores(probs, self.forget_class)
        return {
            "p_forget": p_forget,
            "p_forget_ci": bootstrap_ci(probs[:, self.forget_class], self.budget.seed),
            "entropy": entropy,
            "argmax_forget": (probs.argmax(-1) == self.forget_class).double().mean().item(),
        }

    def p_forget(self, unet) -> float:
        """The cheap probe used along relearning: P(y = c_f) of ``probe_samples`` class-c_f samples."""
        probs = classifier_probs(self.classifier, self.images(unet, self.forget_class, probe=True))
        return probs[:, self.forget_class].mean().item()


@dataclass
class AttackRun:
    """One attack's figures (``record``) and its class-c_f samples for the figure."""

    record: dict[str, Any]
    images: Tensor


def pick(data: ImageData, n: int, generator: torch.Generator, what: str) -> ImageData:
    """``n`` images drawn without replacement from ``data`` (seeded)."""
    if n > len(data):
        raise UsageError(f"attack budget asks for {n} {what} images, but the data has only {len(data)}")
    return data.subset(torch.randperm(len(data), generator=generator)[:n])


def optimise_embedding(
    unet,
    images: ImageData,
    rows: Callable[[], Tensor],
    variables: list[Tensor],
    lr: float,
    budget: Budget,
    generator: torch.Generator,
    *,
    project: Callable[[], None] | None = None,
    desc: str,
    progress: bool,
) -> list[float]:
    """min over ``variables`` of E L(x_0, rows()[0]) on ``images`` with Adam, θ frozen; returns the losses.

    ``project`` runs after every step (the mixture's simplex projection).
    """
    from tqdm.auto import tqdm

    scheduler = make_scheduler("ddpm")
    optimizer = torch.optim.Adam(variables, lr=lr)
    sampler = BatchSampler(images, budget.batch_size, int(torch.randint(2**31, (), generator=generator)))
    device = next(unet.parameters()).device
    losses = []
    was_training = unet.training
    unet.eval()
    with attacked_embedding(unet, rows) as label:
        eps = unet_eps(unet)
        for _ in tqdm(range(budget.steps), desc=desc, disable=not progress, leave=False):
            x0, _ = sampler.next()
            cond = torch.full((len(x0),), label, device=device)
            loss = denoising_loss(eps, diffuse(scheduler, x0.to(device), cond, generator))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if project is not None:
                with torch.no_grad():
                    project()
            losses.append(loss.item())
    unet.train(was_training)
    return losses


def concept_inversion(
    unet, forget: ImageData, scorer: Scorer, generator: torch.Generator, progress: bool = True
) -> AttackRun:
    """Attack 1: a new class-embedding vector learned on N images of c_f (θ frozen), then sampled."""
    t0, budget = time.perf_counter(), scorer.budget
    images = pick(forget, budget.num_images, generator, "forget-class")
    table = unet.class_embedding.weight.detach()
    vector = table[null_class(unet)].clone().unsqueeze(0).requires_grad_(True)
    losses = optimise_embedding(
        unet,
        images,
        lambda: vector,
        [vector],
        budget.inversion_lr,
        budget,
        generator,
        desc="inversion",
        progress=progress,
    )
    with torch.no_grad(), attacked_embedding(unet, lambda: vector.detach()) as label:
        samples = scorer.images(unet, label, desc="sampling inversion")
    e = vector.detach()[0]
    record = {
        **scorer.score(samples),
        **loss_record(losses, t0),
        "vector_norm": e.norm().item(),
        "cosine_to_forget_embedding": nn.functional.cosine_similarity(
            e, table[scorer.forget_class], dim=0
        ).item(),
        "vector": e.tolist(),
    }
    return AttackRun(record, samples)


@torch.no_grad()
def best_start(unet, images: ImageData, table: Tensor, generator: torch.Generator, draws: int = 4) -> Tensor:
    """The simplex point with the lowest denoising loss among the uniform point and every vertex
    (each class row, null included), on a fixed batch: ``draws`` (t, ε) draws per image.

    On the digits base model the loss over the simplex is not convex: projected Adam from the uniform
    point (UnlearnDiffAtk's start, where enumerating 49k vertices is out of reach) settled in a mixture
    of other classes with a higher loss than the c_f vertex. With C + 2 candidates, checking them all
    costs less than one optimisation step per candidate and makes the search at least as strong.
    """
    device = table.device
    x0 = images.images.repeat(draws, 1, 1, 1).to(device)
    b = diffuse(make_scheduler("ddpm"), x0, torch.zeros(len(x0), dtype=torch.long, device=device), generator)
    k = len(table)
    candidates = torch.cat([torch.full((1, k), 1.0 / k, device=device), torch.eye(k, device=device)])
    losses = []
    for w in candidates:
        with attacked_embedding(unet, lambda w=w: (w @ table)[None]) as label:
            cond = torch.full((len(x0),), label, device=device)
            losses.append(denoising_loss(unet_eps(unet), b._replace(cond=cond)).item())
    return candidates[min(range(len(losses)), key=losses.__getitem__)]


def embedding_mixture(
    unet, forget: ImageData, scorer: Scorer, generator: torch.Generator, progress: bool = True
) -> AttackRun:
    """Attack 2: e = wᵀE, w on the simplex over every class row (null included), projected Adam."""
    t0, budget = time.perf_counter(), scorer.budget
    images = pick(forget, budget.num_images, generator, "forget-class")
    table = unet.class_embedding.weight.detach()
    if budget.mixture_start == "best":
        start = best_start(unet, images, table, generator)
    else:
        start = torch.full((len(table),), 1.0 / len(table), device=table.device)
    weights = start.clone().unsqueeze(0).requires_grad_(True)

    def project() -> None:
        weights.copy_(project_simplex(weights))

    losses = optimise_embedding(
        unet,
        images,
        lambda: weights @ table,
        [weights],
        budget.mixture_lr,
        budget,
        generator,
        project=project,
        desc="mixture",
        progress=progress,
    )
    w = weights.detach()
    with torch.no_grad(), attacked_embedding(unet, lambda: w @ table) as label:
        samples = scorer.images(unet, label, desc="sampling mixture")
    record = {
        **scorer.score(samples),
        **loss_record(losses, t0),
        "start": "uniform" if (start > 0).all() else f"class row {int(start.argmax())}",
        "weight_forget_class": w[0, scorer.forget_class].item(),
        "weight_null": w[0, null_class(unet)].item(),
        "weights": w[0].tolist(),
    }
    return AttackRun(record, samples)


def fine_tune_attack(
    unet,
    train: ImageData,
    scorer: Scorer,
    steps: int,
    batch_size: int,
    probe_every: int,
    generator: torch.Generator,
    *,
    desc: str,
    progress: bool = True,
) -> AttackRun:
    """Fine-tune every weight of a copy of ``unet`` on ``train`` with the plain training loss; probe
    P(y = c_f) at step 0 and every ``probe_every`` steps (and at the end)."""
    from tqdm.auto import tqdm

    t0, budget = time.perf_counter(), scorer.budget
    model = copy.deepcopy(unet).train().requires_grad_(True)
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=budget.relearn_lr)
    scheduler = make_scheduler("ddpm")
    sampler = BatchSampler(train, batch_size, int(torch.randint(2**31, (), generator=generator)))
    eps = unet_eps(model)
    probes = {0: scorer.p_forget(model)}
    losses = []
    for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False):
        x0, c = sampler.next()
        loss = denoising_loss(eps, diffuse(scheduler, x0.to(device), c.to(device), generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % probe_every == 0 or step == steps:
            probes[step] = scorer.p_forget(model)
    model.eval()
    samples = scorer.images(model, scorer.forget_class, desc=f"sampling {desc}")
    crossed = next((s for s, p in probes.items() if p >= RELEARN_THRESHOLD), None)
    record = {
        **scorer.score(samples),
        "num_images": len(train),
        "p_forget_at": {str(s): p for s, p in probes.items()},
        "steps_to_threshold": crossed,
        "auc": probe_auc(probes, steps),
        "threshold": RELEARN_THRESHOLD,
        **loss_record(losses, t0),
    }
    return AttackRun(record, samples)


def relearn(unet, forget: ImageData, scorer: Scorer, generator: torch.Generator, progress: bool = True):
    """Attack 3: fine-tune on n real images of c_f (batch n) for m steps."""
    b = scorer.budget
    images = pick(forget, b.relearn_images, generator, "forget-class")
    return fine_tune_attack(
        unet,
        images,
        scorer,
        b.relearn_steps,
        b.relearn_images,
        b.probe_every,
        generator,
        desc="relearn",
        progress=progress,
    )


def benign(unet, retain: ImageData, scorer: Scorer, generator: torch.Generator, progress: bool = True):
    """Attack 4: fine-tune on the retained classes only (batch ``batch_size``) for ``benign_steps``."""
    b = scorer.budget
    return fine_tune_attack(
        unet,
        retain,
        scorer,
        b.benign_steps,
        b.batch_size,
        b.benign_probe_every,
        generator,
        desc="benign",
        progress=progress,
    )


ATTACK_FUNCTIONS = {"inversion": concept_inversion, "mixture": embedding_mixture, "relearn": relearn}


def parse_attacks(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"all"`` → every attack; ``"inversion,relearn"`` or a sequence → those, validated, in order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return ATTACKS
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names:
        raise UsageError(
            f"unknown attack(s) {', '.join(unknown) or '(none)'}; expected all or some of "
            f"{', '.join(ATTACKS)}"
        )
    return tuple(dict.fromkeys(names))


def attack_unet(
    unet,
    classifier: nn.Module,
    data: ImageData,
    forget_class: int,
    attacks: tuple[str, ...] = ATTACKS,
    budget: Budget | None = None,
    *,
    progress: bool = True,
) -> tuple[dict[str, dict], dict[str, Tensor]]:
    """Run ``attacks`` on ``unet`` (never modified): ({"none": ..., attack: record}, {name: samples}).

    ``none`` is the unattacked model's class-c_f samples, scored the same way. Each attack draws its
    randomness from its own generator seeded by ``budget.seed``, so any subset of attacks gives the
    same figures for the attacks it shares with another subset.
    """
    budget = budget or Budget()
    check_class(forget_class, data.num_classes)
    retain, forget = split_forget(data, forget_class)
    scorer = Scorer(classifier, forget_class, budget, progress)
    was_training = unet.training
    unet.eval()
    results = {"none": scorer.score(images := scorer.images(unet, forget_class, desc="sampling none"))}
    samples = {"none": images}
    for name in attacks:
        generator = torch.Generator().manual_seed(budget.seed * 1000 + 1 + ATTACKS.index(name))
        run = (
            benign(unet, retain, scorer, generator, progress)
            if name == "benign"
            else ATTACK_FUNCTIONS[name](unet, forget, scorer, generator, progress)
        )
        results[name], samples[name] = run.record, run.images
    unet.train(was_training)
    return results, samples


def cached_attack(
    path: str,
    classifier: nn.Module,
    data: ImageData,
    forget_class: int,
    attacks: tuple[str, ...],
    budget: Budget,
    state_file: str,
    *,
    resume: bool = False,
    unet=None,
    progress: bool = True,
) -> tuple[dict[str, dict], dict[str, Tensor] | None]:
    """:func:`attack_unet` on the checkpoint ``path`` (or the already loaded ``unet``), its results kept in
    ``state_file``. With ``resume``, a state file made from the same checkpoint file (sha256), attacks
    and budget is reused instead; the samples are then None."""
    with open(path, "rb") as f:
        key = {
            "model_sha256": hashlib.sha256(f.read()).hexdigest(),
            "attacks": list(attacks),
            "budget": dataclasses.asdict(budget),
        }
    saved = read_json(state_file) if resume and os.path.isfile(state_file) else {}
    if {k: saved.get(k) for k in key} == key:
        return saved["results"], None
    if unet is None:
        unet = load_unet(path)[0].to(next(classifier.parameters()).device).eval()
    results, samples = attack_unet(unet, classifier, data, forget_class, attacks, budget, progress=progress)
    write_json(state_file, {**key, "results": results})
    return results, samples


def demo_attacks(
    models: dict[str, str],
    classifier: nn.Module,
    data: ImageData,
    forget_class: int,
    *,
    seed: int,
    state_dir: str,
    resume: bool = False,
    budget: Budget | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """``demo --attacks``: every checkpoint of ``models`` ({name: path}) under every attack at ``budget``
    (default: :class:`Budget`) with the demo's seed; returns {name: :func:`summary`}. Each model's full
    results go to ``state_dir/attack_<name>.json``, which ``resume`` reuses (:func:`cached_attack`)."""
    out = {}
    run_budget = dataclasses.replace(budget or Budget(), seed=seed)
    for name, path in models.items():
        state = os.path.join(state_dir, f"attack_{name}.json")
        results, _ = cached_attack(
            path, classifier, data, forget_class, ATTACKS, run_budget, state, resume=resume, progress=progress
        )
        out[name] = summary(results)
        print(report_line(name, results), flush=True)
    return out
