"""torch's intra-op threads on a machine shared with other jobs.

torch starts one thread per core, whether or not other processes are using them; on a busy machine
those threads spin against the other jobs and a run can take several times longer than with one
thread (issue 10 reported the demo at 51 minutes instead of about 7.5 on 2 busy cores).
:func:`configure_threads`, which the ``constrained-opt`` command calls, uses only the CPUs that are
free: the affinity mask (capped by a cgroup quota) minus the load average's share of them.
"""

from __future__ import annotations

import math
import os

OVERRIDES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def choose_threads(cpus: int, total: int, load: float, default: int) -> int:
    """Threads for this process: the CPUs it may use minus the share of the load average that falls
    on them, rounded, between 1 and torch's ``default``.

    ``cpus``: CPUs this process may run on (affinity, cgroup quota); ``total``: CPUs the load average
    is measured over (the host's, in a container); ``load``: the 1-minute load average.
    """
    busy = load * cpus / max(total, 1)
    return max(1, min(default, math.floor(cpus - busy + 0.5)))


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


def configure_threads() -> str | None:
    """Set ``torch.set_num_threads`` to :func:`choose_threads` for this machine, unless the user chose
    (``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set). Returns a one-line note when the machine is busy
    (fewer threads than torch would start), else None."""
    import torch

    if any(os.environ.get(name) for name in OVERRIDES):
        return None
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        return None
    cpus, default = usable_cpus(), torch.get_num_threads()
    threads = choose_threads(cpus, os.cpu_count() or cpus, load, default)
    if threads >= default:
        return None
    torch.set_num_threads(threads)
    return (
        f"the machine is busy (load average {load:.1f} on {cpus} CPUs): using {threads} torch "
        f"thread{'s' if threads > 1 else ''} instead of {default}; set OMP_NUM_THREADS=N to choose"
    )
