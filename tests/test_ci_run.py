"""CI runs the README's test command step for step, so it fails where a new user's first run would."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTROL = ("set ", "cd ", "status=", "if ", "fi", "exit ", "echo ")  # the script's own plumbing


def test_ci_runs_the_readme_test_command_and_nothing_else():
    quick_start = ROOT.joinpath("README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    (command,) = [line for line in quick_start.splitlines() if "pytest" in line]
    steps = command.split(" && ")
    script = ROOT.joinpath(".ci", "run").read_text()
    commands = [
        line
        for line in script.splitlines()
        if line.strip() and not line.startswith(("#", *CONTROL)) and not line.startswith(" ")
    ]
    # --clear: a .venv left by an earlier CI run is emptied first, as a fresh clone has none
    assert commands == [steps[0].replace("-m venv ", "-m venv --clear "), *steps[1:]]
    assert '[ "$status" -eq 5 ]' in script  # "no tests collected" fails CI


def test_a_hung_test_times_out_and_slow_tests_can_be_skipped(pytestconfig):
    """pytest-timeout (in the dev extra) fails a test that runs past the configured limit instead of
    hanging CI; the registered ``slow`` marker lets ``-m "not slow"`` skip the slowest tests."""
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert 60 <= float(pytestconfig.getini("timeout")) <= 600
    assert any(line.startswith("slow:") for line in pytestconfig.getini("markers"))
