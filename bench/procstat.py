"""CPU and memory of processes, from /proc: what each round costs the service, the generator, the rest."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), in seconds; 0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(b")") + 2 :].split()  # the command may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def system_busy_seconds() -> float:
    """CPU seconds spent busy by every core since boot (user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _stats() -> Iterator[tuple[int, str, list[bytes]]]:
    """(pid, command, the fields after it) of every process now, from /proc/PID/stat."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # it exited meanwhile
        comm = raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode(errors="replace")
        yield int(name), comm, raw[raw.rindex(b")") + 2 :].split()


def _cpu_seconds(fields: list[bytes]) -> float:
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def all_processes() -> dict[int, tuple[str, float]]:
    """pid -> (command, CPU seconds) for every process now."""
    return {pid: (comm, _cpu_seconds(fields)) for pid, comm, fields in _stats()}


@dataclass
class CpuWindow:
    """CPU used over a window by named processes, and by everything else on the machine ("foreign").

    `foreign_percent` (% of one core) is all busy CPU time (/proc/stat) minus the named processes':
    other engineers' tests are mostly short-lived processes, which per-process accounting misses.
    `foreign_top` names the long-lived processes among them.
    """

    pids: dict[str, int]
    wall: float = 0.0
    start: dict[int, tuple[str, float]] | None = None
    start_busy: float = 0.0
    percent: dict[str, float] | None = None
    foreign_percent: float = 0.0
    foreign_top: list[str] | None = None

    def begin(self, now: float) -> None:
        self.wall = now
        self.start = all_processes()
        self.start_busy = system_busy_seconds()

    def end(self, now: float) -> None:
        assert self.start is not None
        busy = system_busy_seconds() - self.start_busy
        finish = all_processes()
        elapsed = max(now - self.wall, 1e-9)
        used = {
            pid: cpu - self.start.get(pid, (comm, 0.0))[1] for pid, (comm, cpu) in finish.items()
        }
        ours = set(self.pids.values())
        self.percent = {
            name: 100.0 * used.get(pid, 0.0) / elapsed for name, pid in self.pids.items()
        }
        self.foreign_percent = max(
            0.0, 100.0 * (busy - sum(used.get(p, 0.0) for p in ours)) / elapsed
        )
        others = sorted(((s, pid) for pid, s in used.items() if pid not in ours), reverse=True)[:3]
        self.foreign_top = [
            f"{finish[pid][0]}({pid}) {100.0 * s / elapsed:.0f}%"
            for s, pid in others
            if s / elapsed > 0.02
        ]


def set_affinity(pid: int, cpus: set[int] | None) -> None:
    if cpus:
        try:
            os.sched_setaffinity(pid, cpus)
        except OSError:
            pass


def load_average() -> float:
    return os.getloadavg()[0]


def busy_processes(min_percent: float = 20.0, exclude: set[int] | None = None) -> list[str]:
    """Processes that used more than `min_percent` of a core over their lifetime (a cheap `top`)."""
    exclude = exclude or set()
    out = []
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    for pid, comm, fields in _stats():
        if pid in exclude:
            continue
        cpu = _cpu_seconds(fields)
        age = uptime - int(fields[19]) / CLK_TCK
        if age > 1 and 100.0 * cpu / age >= min_percent:
            out.append(f"{pid}:{comm}:{100.0 * cpu / age:.0f}%")
    return out


def event_loop_of(pid: int) -> str:
    """ "uvloop" if the process has uvloop's extension mapped (it runs on it), else "asyncio"."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "uvloop" if any("uvloop/loop" in line for line in f) else "asyncio"
    except OSError:
        return "?"
