"""Class unlearning for diffusion models, in one-way layers (a module imports only from its own layer or
the layers above it in this list):

1. :mod:`.runtime`: errors, atomic files, devices, output folders, provenance, resume bookkeeping;
2. :mod:`.data`, :mod:`.models`, :mod:`.sampling`, :mod:`.losses`, :mod:`.train`: datasets in [-1, 1],
   ``UNet2DModel`` presets with a null class and the evaluation CNN, DDPM/DDIM sampling with
   classifier-free guidance, the ε-prediction losses, base-model training;
3. :mod:`.evaluation`: metrics, several forget classes, statistics over seeds, tables and figures;
4. :mod:`.methods`: EraseDiff and the baselines, one per module, and the shared unlearning loop;
5. :mod:`.attacks`: attacks that try to bring an erased class or concept back;
6. :mod:`.jobs`: ``train-base``, ``unlearn ddpm``, ``evaluate``, ``attack ddpm`` and ``demo``;
7. :mod:`.cli`: the ``constrained-opt`` commands, each registering itself.

:mod:`.sd` holds the Stable Diffusion side. Modules import their heavy dependencies (diffusers,
torchvision, scikit-learn, torchmetrics, matplotlib) inside functions, so ``import constrained_opt``
needs only torch and numpy.
"""
