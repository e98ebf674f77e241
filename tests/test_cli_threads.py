"""The command picks torch's threads from the free CPUs on a busy machine."""

import os
import sys

import pytest
import torch

from constrained_opt import threads
from constrained_opt.cli import main


@pytest.mark.parametrize(
    ("cpus", "total", "load", "default", "expected"),
    [
        (2, 2, 6.1, 2, 1),  # two cores, other jobs using them: one thread
        (2, 2, 0.2, 2, 2),  # an idle machine keeps torch's default
        (16, 16, 12.0, 8, 4),  # 4 of 16 CPUs free
        (16, 16, 1.0, 8, 8),  # never more than torch's default (physical cores)
        (2, 64, 30.0, 2, 1),  # container on a busy 64-CPU host: 30·2/64 ≈ 0.9 of our 2 CPUs busy
        (4, 64, 3.0, 4, 4),  # container on a quiet host
    ],
)
def test_choose_threads(cpus, total, load, default, expected):
    assert threads.choose_threads(cpus, total, load, default) == expected


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_busy_machine_gets_fewer_threads_and_a_note(monkeypatch, capsys, torch_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    torch.set_num_threads(2)  # torch's default on two cores
    monkeypatch.setattr(sys, "argv", ["constrained-opt", "evaluate", "--model", "bad", "--forget-class", "0"])
    assert main() == 2  # the command itself fails at once (--model needs NAME=PATH)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "constrained-opt: the machine is busy (load average 50.0 on 2 CPUs): using 1 torch thread "
        "instead of 2; set OMP_NUM_THREADS=N to choose"
    )
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert main(sys.argv[1:]) == 2  # main(argv) called from Python leaves the process's threads alone
    assert torch.get_num_threads() == 2


def test_the_users_choice_is_kept(monkeypatch, capsys, torch_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    torch.set_num_threads(2)
    monkeypatch.setattr(sys, "argv", ["constrained-opt", "evaluate", "--model", "bad", "--forget-class", "0"])
    assert main() == 2
    assert "busy" not in capsys.readouterr().err and torch.get_num_threads() == 2


def test_usable_cpus_respects_the_affinity_mask():
    assert 1 <= threads.usable_cpus() <= len(os.sched_getaffinity(0))
