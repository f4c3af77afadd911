"""Sampling /proc: a process tree's RSS, threads and CPU ticks, one core's busy ticks, and the
kernel's view of a stuck process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from .constants import KiB

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // KiB


@dataclass(frozen=True)
class TreeSample:
    """Resource use of a process and all its descendants at one instant."""

    pids: tuple[int, ...]
    rss_kib: int
    threads: int
    cpu_ticks: int


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the parent links in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def sample_tree(root: int) -> TreeSample:
    pids = process_tree(root)
    rss = threads = ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime + stime
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("Threads:"):
                threads += int(line.split()[1])
    return TreeSample(tuple(pids), rss, threads, ticks)


def core_busy_ticks(cpu: str | None) -> int | None:
    """Clock ticks one core spent running processes (user + nice + system), from /proc/stat.

    Interrupt and softirq time is left out: at high request rates much of it is the loopback
    network work of the benchmark itself, not noise. None when not pinned to a single core.
    """
    if cpu is None or not cpu.isdigit():
        return None
    prefix = f"cpu{cpu} "
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(prefix):
                user, nice, system = (int(v) for v in line.split()[1:4])
                return user + nice + system
    return None


def process_state(pid: int) -> str:
    """The kernel's view of a stuck process, for failure reports."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        return "process gone"
    state = next((line for line in status.splitlines() if line.startswith("State:")), "")
    return f"{state.strip()} wchan={wchan or '-'}"
