"""Hypothesis runs under the registered profile ``ci``: examples drawn from a seed derived from each
test (``derandomize``), so the README's test command and CI run the same examples every time, and no
deadline (a loaded machine must not fail a property). ``--hypothesis-seed=N`` explores other examples:
derandomize would override it, so the profile ``ci-seeded`` (``ci`` without it) is loaded then.
``--hypothesis-profile=NAME`` still picks any profile."""

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("ci-seeded", settings.get_profile("ci"), derandomize=False)


def pytest_configure(config):
    if config.getoption("hypothesis_profile", None) is None:
        settings.load_profile("ci" if config.getoption("hypothesis_seed") is None else "ci-seeded")
