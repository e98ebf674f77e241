"""Stable Diffusion unlearning as in the EraseDiff paper (§5.3): nudity on SD v1.4 and Imagenette classes.

Every module imports diffusers/transformers/torchvision inside functions, so importing this package
needs only torch and numpy.

- :mod:`.prompts`: the shipped prompt sets (four nudity prompts, Imagenette classes) and the task.
- :mod:`.loading`: a pipeline from a diffusers folder, a single ``.ckpt``/``.safetensors`` file or a hub id.
- :mod:`.latents`: self-generated forget/retain sets, cached on disk as latents (resumable).
- :mod:`.train`: parameter sets (ESD's noxattn/xattn/full), EraseDiff, ESD and SalUn, ``unlearn_sd``.
- :mod:`.evaluate`: generation from I2P-style CSVs, NudeNet counts, UA, CLIP score, FID.
- :mod:`.cli`: ``constrained-opt unlearn sd`` and ``constrained-opt sd {generate,nudenet,ua,clip-score,fid}``.
"""
