"""Side-by-side measurements of speed, memory and unlearning quality. Run ``python -m benchmarks``."""
