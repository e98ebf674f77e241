import pytest


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def private_cache(cache_home, monkeypatch):
    """The benchmarks' subprocesses write their caches under a temporary $XDG_CACHE_HOME, not the user's
    ~/.cache: constrained_opt's (runtime/paths.py), and matplotlib's, Hugging Face's and torch's, which
    default under it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
