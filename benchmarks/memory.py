"""Resident memory of a process from /proc: its peak (VmHWM) and current (VmRSS) size in KB.

Not `getrusage(...).ru_maxrss`: Linux keeps that across fork and exec, so a child reports the peak
of the parent it was forked from whenever that was larger than its own.
"""

from __future__ import annotations

import os


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
