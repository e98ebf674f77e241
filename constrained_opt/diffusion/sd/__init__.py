"""Stable Diffusion unlearning as in the EraseDiff paper (§5.3): nudity and Imagenette classes, on SD 1.x,
SD 2.x (v-prediction) and SDXL, with full weights or a LoRA adapter.

Every module imports diffusers/transformers/torchvision inside functions, so importing this package
needs only torch and numpy.

- :mod:`.prompts`: the shipped prompt sets (four nudity prompts, Imagenette classes) and the task.
- :mod:`.loading`: a pipeline (SD or SDXL, detected) from a diffusers folder, a single ``.ckpt``/
  ``.safetensors`` file or a hub id.
- :mod:`.model`: prompt tables and UNet calls for SD and SDXL, ε- and v-prediction targets.
- :mod:`.params`: ESD's parameter sets (noxattn/xattn/full).
- :mod:`.lora`: LoRA adapters on those sets, written for ``pipe.load_lora_weights``.
- :mod:`.latents`: self-generated forget/retain sets, cached on disk as latents (resumable).
- :mod:`.evaluate`: generation from I2P-style CSVs, NudeNet counts, UA, CLIP score, FID.
- :mod:`.job`: the settings of one ``unlearn sd`` run (:class:`~.job.SDJob`).
- :mod:`.methods`: EraseDiff, ESD and SalUn through accelerate.

The ``unlearn sd`` and ``attack sd`` jobs are in :mod:`constrained_opt.diffusion.jobs` (``sd_unlearn``,
``sd_attack``), the attacks in :mod:`constrained_opt.diffusion.attacks.sd` and the commands in
:mod:`constrained_opt.diffusion.cli.sd`. :mod:`.attacks`, :mod:`.train` and :mod:`.cli` are deprecated
aliases of those.
"""
