"""Layer 4: the unlearning methods, one per module.

EraseDiff and the baselines behind one interface, and the shared unlearning harness.

Every method sees the same stream: at each of ``steps`` steps the harness draws one retain batch and
one forget batch of ``batch_size`` images (same seeds for every method) and calls ``method.step``.
Work done once before the loop (SalUn's mask, SA's replay set and Fisher) is the *preparation* stage;
``time_s`` counts only the loop, as in the paper's Table 4, while peak memory covers both stages.

SalUn and Selective Amnesia reproduce their authors' DDPM releases (OPTML-Group/Unlearn-Saliency
``DDPM/runners/diffusion.py`` and ``DDPM/functions/losses.py``; clear-nus/selective-amnesia
``ddpm/runners/diffusion.py``): pixel-*sum* losses, antithetic timesteps, label dropout, SalUn's
pseudo label and clipped, guided mask gradients, SA's Fisher summed over all T timesteps. docs/ddpm.md
lists each hyperparameter with its source file. ``PUBLISHED`` holds each method's published
(steps, batch size).

Defaults (per method, overridable with ``--hp key=value``); all use Adam at the shared ``lr`` and clip
the update norm at 1.0 as in the authors' DDPM code:

- ``erasediff``: rule ``grad_norm``, η = 1, K = 1 inner step at ξ = 1e-4, forget target ``rl``.
- ``erasediff_shared_adam``: the same update, but the K inner steps go through the *outer* Adam
  (approximating the authors' release), whose moments then carry forget-loss gradients into the next
  update.
- ``erasediff_release``: the authors' released loop (JingWu321/EraseDiff ``ddpm/runners/diffusion.py``
  ``train_ours``): before every phase, K = 2 unclipped passes over D_f through the outer Adam, θ
  restored; then δ = ∇L_r + λ∇L_f with λ = 0.1 (or the cosine rule), label dropout 0.1 in the forget
  passes, target ``rl``.
- ``moo``: Eq. 3 scalarised, δ = ∇L_r + w∇L_f with w = 1 (``rule="scalarized"``, K = 0), target ``rl``.
- ``finetune``: L_r only.
- ``neggrad``: −L_denoise on the forget batch (gradient ascent), nothing else.
- ``salun``: mask = top 50% of |Σ_batches clip(∇ Σ_pixels ‖ε − ε̃_θ(x_t|c_f)‖²)| (ε̃ guided, w = 2); loss
  MSE(ε_θ(x_t|c_f), sg ε_θ(x_t|(c_f+1) mod C)) + α·(1/B)Σ_i‖ε − ε_θ(x_t|c)‖²_pixel-sum, α = 1e-3,
  label dropout 0.1; gradients clipped, then multiplied by the mask.
- ``sa``: loss Σ_pixels-loss(x̃ ~ U[−1,1]^d | c_f) + γ Σ_pixels-loss(replay) + λ Σ F(θ − θ*)², γ = 1,
  λ = 10, shared antithetic t; F = SA's Fisher (:func:`~.losses.timestep_summed_fisher`) over the
  generated samples of every class; replay = the remembered classes' samples. Samples per class:
  10% of the training images per class (SA: 500 of CIFAR-10's 5000).
- ``meta_unlearning``: Meta-Unlearning's ESD meta step (sail-sg/Meta-Unlearning ``src/esd_meta.py``):
  δ = ∇L_f(θ) + ∇L_r(θ) + ∇ℓ_tgt(θ) − [∇L_denoise(D_f; θ′) + ∇ℓ_tgt(θ′) + ∇L_r(θ′)], θ′ a copy
  after 3 AdamW fine-tuning steps on D_f, ℓ_tgt the denoising loss on the related retained class,
  every γ = 1; outer AdamW, weight decay 1e-4.
- ``advunlearn``: AdvUnlearn (OPTML-Group/AdvUnlearn): L_f(θ, c*) + 0.3·L_r, c* = 30 Adam steps (lr
  1e-3) on c_f's class-embedding row against the forget images' denoising loss, after 200 warmup steps.
"""
