"""Robust forget rows for EraseDiff on Stable Diffusion (``unlearn sd --robust``; docs/sd.md, "Robust
rows on SD"): the core's :mod:`constrained_opt.robust` declarations built from the job's settings and a
step's forget batch.

Per concept (one, or each group of a multi-concept task), with b the concept's rows of the forget
batch, c_f their forget prompts, ε_f = sg ε_θ(x_t | c_m) the anchor target and
L_c(θ, c) = E‖ε_f − ε_θ(x_t | c)‖² (EraseDiff's forget loss), the step's constraints are the plain row
L_c(θ, c_f) (named by the concept, ``forget`` for one concept) and, for each form:

* ``relearn``: :class:`~constrained_opt.Relearn`, L_a = E‖ε − ε_θ(x_t | c_f)‖², the plain denoising loss
  on images of the concept (the step's forget batch, or with ``--relearn-images`` a batch of the user's
  images): the row is ∇L_c(θ′), θ′ = θ after ``relearn_steps`` gradient steps of size ``relearn_lr``;
* ``sharpness``: :class:`~constrained_opt.Sharpness` of radius ``sharpness_rho``, L_a = L_c (SAM);
* ``inversion``: :class:`~constrained_opt.Inversion` over x, K token embeddings prepended to c_f
  (:class:`~constrained_opt.diffusion.sd.model.PrefixedPrompts`, AdvUnlearn's ``prefix_k``),
  L_a = −E‖ε − ε_θ(x_t | [x; c_f])‖² on the forget batch (the prompt that best denoises the concept's
  images, AdvUnlearn's attack objective with the images' true noise as its target), steps of length
  ``inversion_lr`` in the ``inversion_norm`` (∞: sign steps, the size of Adam's early steps), within
  ‖x − x_0‖ ≤ ``inversion_eps`` (None: unconstrained); the row is ∇_θ L_c(θ, [x_k; c_f]) (Danskin).
  x_0: K random vocabulary tokens' embeddings, drawn once per job (AdvUnlearn's ``init_adv``); the core
  puts x back after each step, so every step's attack starts from x_0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..losses import Noised, denoising_loss, forget_loss
from .job import INVERSION_NORMS


def row_name(concept: str, form: str | None) -> str:
    """The constraint's name: ``forget``/``<form>`` for one concept, ``<concept>``/``<concept>/<form>``."""
    if not concept:
        return form or "forget"
    return concept if form is None else f"{concept}/{form}"


class RobustRows:
    """A step's robust rows for one concept, built from micro-batch closures.

    ``prefix`` (for ``inversion``) encodes the concept's forget prompts with the adversarial tokens and
    reads ``vector``, the Inversion's input; ``eps`` is the trained UNet on table rows,
    ``eps_prefixed`` the same UNet on ``prefix``'s hidden states."""

    def __init__(self, job, eps, vector: Tensor | None = None, eps_prefixed=None):
        self.job, self.eps, self.vector, self.eps_prefixed = job, eps, vector, eps_prefixed
        if "inversion" in job.robust and (vector is None or eps_prefixed is None):
            raise ValueError("robust inversion needs the adversarial token embeddings and their encoder")

    def parts(self, b: Noised, target: Tensor, relearn_batch: Noised | None) -> dict[str, Callable]:
        """The closures of one micro-batch: ``plain`` (L_c), and per form its constraint and attacker."""
        eps, out = self.eps, {}
        out["plain"] = lambda: forget_loss(eps, b, target)
        if "relearn" in self.job.robust:
            batch = b if relearn_batch is None else relearn_batch
            out["relearn_attack"] = lambda: denoising_loss(eps, batch)
        if "inversion" in self.job.robust:
            adv = self.eps_prefixed
            out["inversion"] = lambda: forget_loss(adv, b, target)
            out["inversion_attack"] = lambda: -denoising_loss(adv, b)
        return out

    def constraints(self, concept: str, parts: list[dict[str, Callable]], closure) -> dict[str, Any]:
        """``{plain name: L_c, robust names: declarations}`` over the step's micro-batches
        (``closure`` makes one closure of a list of parts: the part, or ``MicroBatches``)."""
        from constrained_opt import Inversion, Relearn, Sharpness

        job = self.job

        def of(key: str):
            return closure([p[key] for p in parts])

        plain = of("plain")
        rows: dict[str, Any] = {row_name(concept, None): plain}
        for form in job.robust:
            if form == "relearn":
                row = Relearn(
                    plain,
                    attack=of("relearn_attack"),
                    steps=job.relearn_steps,
                    lr=job.relearn_lr,
                    sign=job.relearn_sign,
                )
            elif form == "sharpness":
                row = Sharpness(plain, rho=job.sharpness_rho)
            else:
                row = Inversion(
                    of("inversion"),
                    input=self.vector,
                    steps=job.inversion_steps,
                    lr=job.inversion_lr,
                    eps=job.inversion_eps,
                    norm=INVERSION_NORMS[job.inversion_norm],
                    attack=of("inversion_attack"),
                )
            rows[row_name(concept, form)] = row
        return rows


def initial_tokens(
    embedding: torch.nn.Embedding, vocab: int, count: int, generator: torch.Generator
) -> Tensor:
    """x_0: ``count`` embeddings of random vocabulary tokens (AdvUnlearn's ``init_adv``), a float32 leaf
    tensor of its own (the table is read, never written)."""
    ids = torch.randint(vocab, (count,), generator=generator)
    return embedding.weight.detach()[ids.to(embedding.weight.device)].float().clone()
