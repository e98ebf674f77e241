"""Layer 1 of the diffusion application: errors, files, devices, output folders and provenance.

Nothing here imports any other part of :mod:`constrained_opt.diffusion`.
"""
