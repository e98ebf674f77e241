"""Hypothesis draws its examples from a seed derived from each test (``derandomize``), so the README's
test command and CI run the same examples every time. ``--hypothesis-seed=N`` explores other examples:
derandomize would override it, so it is left off then."""

from hypothesis import settings


def pytest_configure(config):
    settings.register_profile("deterministic", derandomize=config.getoption("hypothesis_seed") is None)
    settings.load_profile("deterministic")
