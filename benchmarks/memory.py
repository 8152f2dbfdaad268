"""Resident memory of a process from /proc: its peak (VmHWM) and current (VmRSS) size in KB.

Not `getrusage(...).ru_maxrss`: Linux keeps that across fork and exec, so a child reports the peak
of the parent it was forked from whenever that was larger than its own.
"""

from __future__ import annotations

import os
import threading


def status_kb(pid: int, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_kb(pid: int | None = None) -> int:
    return status_kb(os.getpid() if pid is None else pid, "VmHWM:")


def rss_kb(pid: int | None = None) -> int:
    return status_kb(os.getpid() if pid is None else pid, "VmRSS:")


class PeakMemory:
    """Peak resident memory of this process's descendants, by name, polled from /proc until stopped.

    `tree_kb` is the largest sampled sum of resident sizes over its descendants (and this process,
    with `include_self`): what the machine had to hold at once for the whole run.
    """

    def __init__(self, interval_s: float = 0.5, include_self: bool = True):
        self._interval, self._stop = interval_s, threading.Event()
        self._include_self = include_self
        self.peaks: dict[int, tuple[str, int]] = {}
        self.driver_kb = 0  # this process's largest sampled resident size while the run lasted
        self.tree_kb = 0
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            driver = rss_kb()
            self.driver_kb = max(self.driver_kb, driver)
            tree = driver if self._include_self else 0
            for pid in _descendants(os.getpid()):
                tree += rss_kb(pid)
                hwm = peak_kb(pid)
                if hwm:
                    self.peaks[pid] = (_label(pid), max(hwm, self.peaks.get(pid, ("", 0))[1]))
            self.tree_kb = max(self.tree_kb, tree)
            self._stop.wait(self._interval)

    def by_label(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for label, kb in self.peaks.values():
            out.setdefault(label, []).append(kb)
        return out


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _label(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(a.decode(errors="replace") for a in args)
    for needle, name in (
        ("sdk_worker_main", "SDK worker"),
        ("worker_pool_main", "SDK worker pool"),
        ("local_job_service_main", "job service"),
        ("runners.local_services", "job service + SDK worker pool"),
    ):
        if needle in text:
            return name
    return os.path.basename(args[0].decode(errors="replace")) if args and args[0] else "?"
