"""Run a command as a child process and measure it: wall time, peak resident memory, peak memory of its tree.

Three figures, because each misses something on its own:

- ``max_rss``: the kernel's high-water mark of the child's resident set (``wait4``'s rusage; for a child that
  waited for its own children, the largest of them). Exact, but counts one process only. The kernel carries the
  high-water mark across ``exec``, so a child forked from this (large) Python process would start at its size:
  the command runs under GNU ``time`` (a 2 MB process) where installed, which reports its child's own figure;
- ``peak_tree_pss``: the largest sum, over the child and all its descendants (DataLoader workers, torchrun
  ranks), of their proportional set size (``/proc/PID/smaps_rollup``: pages shared between them counted once),
  sampled every ``interval`` seconds: what the whole stage holds, up to what happens between two samples;
- ``min_available``: the smallest ``MemAvailable`` of the machine seen meanwhile (other processes included).

CPU seconds and the load average at the end say how far the wall time was stretched by other work.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
GNU_TIME = "/usr/bin/time"


@dataclass
class Measured:
    returncode: int
    wall_s: float
    max_rss: int  # bytes
    peak_tree_pss: int  # bytes
    min_available: int  # bytes
    cpu_s: float  # user + system CPU seconds of the child and the children it waited for
    load: float  # the machine's 1-minute load average when the child ended (other processes included)


def _children(pid: int) -> list[int]:
    try:
        tasks = (PROC / str(pid) / "task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(_children(p))
    return found


def pss(pid: int) -> int:
    """Proportional set size of one process in bytes (0 if it is gone)."""
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def mem_available() -> int:
    for line in (PROC / "meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class _Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak, self.min_available = 0, mem_available()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.peak = max(self.peak, sum(pss(p) for p in tree(self.pid)))
            self.min_available = min(self.min_available, mem_available())


def measure(command: list[str], log: Path, interval: float = 0.5, env: dict | None = None) -> Measured:
    """Run ``command`` with stdout and stderr into ``log`` and measure it."""
    start = time.perf_counter()
    report = log.with_name(log.name + ".maxrss")
    timed = [GNU_TIME, "-f", "%M", "-o", str(report), *command] if os.access(GNU_TIME, os.X_OK) else command
    with open(log, "w") as out:
        child = subprocess.Popen(timed, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = _Sampler(child.pid, interval)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    sampler.stopped.set()
    sampler.join()
    max_rss_kb = usage.ru_maxrss  # kilobytes on Linux
    if timed is not command and report.exists():
        lines = report.read_text().split()
        max_rss_kb = int(lines[-1]) if lines and lines[-1].isdigit() else max_rss_kb
        report.unlink()
    return Measured(
        returncode=child.returncode,
        wall_s=time.perf_counter() - start,
        max_rss=max_rss_kb * 1024,
        peak_tree_pss=sampler.peak,
        min_available=sampler.min_available,
        cpu_s=usage.ru_utime + usage.ru_stime,
        load=os.getloadavg()[0],
    )
