"""The bottom layer of the diffusion application: exceptions, atomic file writes, the device, output and
cache directories. It imports nothing else from :mod:`constrained_opt.diffusion`."""
