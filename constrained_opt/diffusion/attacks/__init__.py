"""Attacks that try to bring an erased class or concept back: :mod:`.common` (shared pieces),
:mod:`.ddpm` (class-conditional DDPMs) and :mod:`.sd` (Stable Diffusion). Importing this package loads
none of them."""
