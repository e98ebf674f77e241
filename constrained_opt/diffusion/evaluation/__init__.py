"""Layer 3: how generated images are scored (metrics), summarised over seeds (statistics) and reported."""
