"""Class unlearning for diffusion models: data, ε-prediction losses, baselines, metrics and reports.

Modules import their heavy dependencies (diffusers, torchvision, scikit-learn, torchmetrics, matplotlib)
inside functions, so ``import constrained_opt`` needs only torch and numpy.

- :mod:`.data`: datasets as in-memory tensors in [-1, 1], forget/retain split, resumable batch sampler.
- :mod:`.models`: diffusers ``UNet2DModel`` presets with a null class, the evaluation CNN, checkpoints.
- :mod:`.losses`: denoising loss, EraseDiff forget targets, SalUn mask, Selective Amnesia Fisher/EWC.
- :mod:`.sampling`: DDPM/DDIM sampling with classifier-free guidance.
- :mod:`.metrics`: P(y=c_f|x_f), entropy, accuracy, FID on classifier features, precision/recall, memory.
- :mod:`.baselines`: EraseDiff and the baselines behind one step interface.
- :mod:`.report`: atomic writes, metrics table, sample grids, the Fig. 2 cosine plot.
- :mod:`.ddpm`: orchestration of ``train-base``, ``unlearn ddpm``, ``evaluate`` and ``demo``.
- :mod:`.attacks`: attacks that try to bring an erased class back (``constrained-opt attack ddpm``);
  :mod:`.attacks_cli` registers ``attack {ddpm,sd}``.
"""
