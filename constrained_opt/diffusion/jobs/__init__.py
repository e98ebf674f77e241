"""End-to-end jobs: load, validate, run, write the outputs. One module per job; the CLI calls them."""
