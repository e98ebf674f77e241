"""torch's intra-op threads on a machine shared with other jobs.

torch starts one thread per core, whether or not other processes are using them; on a busy machine
those threads spin against the other jobs and a run can take several times longer than with one
thread (issue 10 reported the demo at 51 minutes instead of about 7.5 on 2 busy cores).
:func:`configure_threads`, which the ``constrained-opt`` command calls, uses only the CPUs that are
free now: the affinity mask (capped by a cgroup quota) minus the share of the host's CPUs that are busy
over the last fraction of a second (``/proc/stat``). The 1-minute load average is not used where
``/proc/stat`` exists: it lags, so a job that has just finished (a ``pip install``) would still count.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

OVERRIDES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
WINDOW_S = 0.25  # how long busy_cpus_now watches /proc/stat


def choose_threads(cpus: int, total: int, load: float, default: int) -> int:
    """Threads for this process: the CPUs it may use minus the share of the host's busy CPUs that falls
    on them, rounded, between 1 and torch's ``default``.

    ``cpus``: CPUs this process may run on (affinity, cgroup quota); ``total``: CPUs ``load`` is
    measured over (the host's, in a container); ``load``: busy CPUs on the host (busy_cpus_now, or the
    load average where there is no ``/proc/stat``).
    """
    busy = load * cpus / max(total, 1)
    return max(1, min(default, math.floor(cpus - busy + 0.5)))


def read_proc_stat() -> str:
    with open("/proc/stat") as f:
        return f.read()


def parse_proc_stat(text: str) -> tuple[int, int, int]:
    """(idle, all) jiffies summed over the host's CPUs (the ``cpu`` line: idle + iowait, and user
    through steal; guest time is already inside user and nice), and the number of CPUs (``cpuN`` lines)."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("cpu "):
        raise ValueError("/proc/stat does not start with the aggregate cpu line")
    fields = [int(v) for v in lines[0].split()[1:9]]
    if len(fields) < 5:
        raise ValueError("/proc/stat's cpu line has no idle and iowait fields")
    cpus = sum(line.startswith("cpu") and line[3:4].isdigit() for line in lines)
    return fields[3] + fields[4], sum(fields), max(cpus, 1)


def busy_cpus_now(
    read: Callable[[], str], sleep: Callable[[float], None], window: float
) -> tuple[float, int] | None:
    """CPUs busy on the host over the next ``window`` seconds, and the CPUs counted:
    (1 − Δidle/Δall)·N from two calls of ``read`` (the text of ``/proc/stat``) with ``sleep(window)``
    between them.
    None where it cannot be read (not Linux). This process sleeps through the window, so it does not
    count itself."""
    try:
        idle0, all0, cpus = parse_proc_stat(read())
        sleep(window)
        idle1, all1, _ = parse_proc_stat(read())
    except (OSError, ValueError):
        return None
    elapsed = all1 - all0
    if elapsed <= 0:  # a window shorter than one jiffy on every CPU: nothing measured
        return None
    return max(0.0, 1 - (idle1 - idle0) / elapsed) * cpus, cpus


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota if there is one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max`` or v1 ``cfs_quota_us``/``cfs_period_us``), or None."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        try:
            with (
                open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f,
                open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as g,
            ):
                quota, period = f.read().strip(), g.read().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def _busy_cpus() -> tuple[float, int, str] | None:
    """(busy CPUs, CPUs counted, a description for the note): /proc/stat now, else the 1-minute load
    average (macOS), else None (Windows)."""
    now = busy_cpus_now(read_proc_stat, time.sleep, WINDOW_S)
    if now is not None:
        return now[0], now[1], f"{now[0]:.1f} of {now[1]} CPUs in use"
    try:
        load, total = os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):
        return None
    return load, total, f"load average {load:.1f} on {total} CPUs"


def configure_threads() -> str | None:
    """Set ``torch.set_num_threads`` to :func:`choose_threads` for this machine, unless the user chose
    (``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set). Returns a one-line note when the machine is busy
    (fewer threads than torch would start), else None."""
    import torch

    if any(os.environ.get(name) for name in OVERRIDES):
        return None
    measured = _busy_cpus()
    if measured is None:
        return None
    load, total, described = measured
    cpus, default = usable_cpus(), torch.get_num_threads()
    threads = choose_threads(cpus, total, load, default)
    if threads >= default:
        return None
    torch.set_num_threads(threads)
    return (
        f"the machine is busy ({described}): using {threads} torch "
        f"thread{'s' if threads > 1 else ''} instead of {default}; set OMP_NUM_THREADS=N to choose"
    )
