"""The command picks torch's threads from the CPUs that are free now on a busy machine."""

import os
import sys
import time

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


def proc_stat(idle: int, busy: int, cpus: int = 2) -> str:
    """/proc/stat text whose ``cpu`` line holds ``idle`` jiffies idle (split into idle and iowait) and
    ``busy`` busy ones (user, system, irq, softirq, steal), the cpuN lines and the lines after them."""
    user, system, irq, softirq, steal = busy - busy // 2 - 3, busy // 2, 1, 1, 1
    line = f"{user} 0 {system} {idle - 5} 5 {irq} {softirq} {steal} 7 0"  # guest 7: counted in user
    per_cpu = "".join(f"cpu{i} 0 0 0 0 0 0 0 0 0 0\n" for i in range(cpus))
    return f"cpu  {line}\n{per_cpu}intr 12345 0 0\nctxt 99\nbtime 1700000000\nprocesses 42\n"


def snapshots(*texts):
    """A read_proc_stat that returns ``texts`` in turn."""
    it = iter(texts)
    return lambda: next(it)


def test_parse_proc_stat():
    assert threads.parse_proc_stat(proc_stat(idle=1000, busy=300, cpus=4)) == (1000, 1300, 4)
    with pytest.raises(ValueError, match="aggregate cpu line"):
        threads.parse_proc_stat("intr 1 2 3\n")


@pytest.mark.parametrize(
    ("idle", "busy", "expected"),
    [(200, 0, 0.0), (100, 100, 1.0), (0, 200, 2.0), (190, 10, 0.1)],  # jiffies in the window, 2 CPUs
)
def test_busy_cpus_now_is_the_busy_share_of_the_window_times_the_cpus(idle, busy, expected):
    slept = []
    read = snapshots(proc_stat(5000, 7000), proc_stat(5000 + idle, 7000 + busy))
    load, cpus = threads.busy_cpus_now(read, slept.append, 0.3)
    assert load == pytest.approx(expected) and cpus == 2 and slept == [0.3]


def test_busy_cpus_now_without_proc_stat_or_without_a_tick_is_unknown():
    def missing():
        raise FileNotFoundError("/proc/stat")

    assert threads.busy_cpus_now(missing, lambda s: None, 0.3) is None
    same = proc_stat(5000, 7000)
    assert threads.busy_cpus_now(snapshots(same, same), lambda s: None, 0.3) is None


def test_busy_cpus_now_on_this_machine():
    load, cpus = threads.busy_cpus_now(threads.read_proc_stat, time.sleep, 0.1)
    assert 0 <= load <= cpus == os.cpu_count()


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_cpus(monkeypatch, torch_threads):
    """Two usable CPUs, torch's default of 2 threads, no user choice, no real window."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads, "WINDOW_S", 0.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    torch.set_num_threads(2)  # torch's default on two cores


def test_an_idle_machine_keeps_its_threads_whatever_the_load_average(monkeypatch, two_cpus):
    """A job that has just finished (a pip install) leaves the 1-minute load average at 1.0 on an idle
    2-core machine; the CPUs idle now decide: 2 threads, no note."""
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 0.6, 0.3))
    monkeypatch.setattr(threads, "read_proc_stat", snapshots(proc_stat(5000, 7000), proc_stat(5049, 7001)))
    assert threads.configure_threads() is None and torch.get_num_threads() == 2


def test_busy_now_is_measured_even_when_the_load_average_is_low(monkeypatch, two_cpus):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    monkeypatch.setattr(threads, "read_proc_stat", snapshots(proc_stat(5000, 7000), proc_stat(5004, 7046)))
    assert threads.configure_threads().startswith("the machine is busy (1.8 of 2 CPUs in use): using 1")
    assert torch.get_num_threads() == 1


def test_without_proc_stat_the_load_average_decides(monkeypatch, two_cpus):
    def missing():
        raise FileNotFoundError("/proc/stat")

    monkeypatch.setattr(threads, "read_proc_stat", missing)
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    assert threads.configure_threads().startswith("the machine is busy (load average 50.0 on 2 CPUs)")
    assert torch.get_num_threads() == 1


def test_a_busy_machine_gets_fewer_threads_and_a_note(monkeypatch, capsys, two_cpus):
    busy = snapshots(proc_stat(5000, 7000), proc_stat(5000, 7050))
    monkeypatch.setattr(threads, "read_proc_stat", busy)
    monkeypatch.setattr(sys, "argv", ["constrained-opt", "evaluate", "--model", "bad", "--forget-class", "0"])
    assert main() == 2  # the command itself fails at once (--model needs NAME=PATH)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "constrained-opt: the machine is busy (2.0 of 2 CPUs in use): using 1 torch thread "
        "instead of 2; set OMP_NUM_THREADS=N to choose"
    )
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert main(sys.argv[1:]) == 2  # main(argv) called from Python leaves the process's threads alone
    assert torch.get_num_threads() == 2


def test_the_users_choice_is_kept(monkeypatch, capsys, torch_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    monkeypatch.setattr(threads, "read_proc_stat", lambda: proc_stat(0, 10**6))  # unread: would be busy
    torch.set_num_threads(2)
    monkeypatch.setattr(sys, "argv", ["constrained-opt", "evaluate", "--model", "bad", "--forget-class", "0"])
    assert main() == 2
    assert "busy" not in capsys.readouterr().err and torch.get_num_threads() == 2


def test_usable_cpus_respects_the_affinity_mask():
    assert 1 <= threads.usable_cpus() <= len(os.sched_getaffinity(0))
