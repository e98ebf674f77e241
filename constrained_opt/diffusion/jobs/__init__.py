"""Layer 6: the jobs the CLI runs (train-base, unlearn, evaluate, attack, demo), as Python functions."""
