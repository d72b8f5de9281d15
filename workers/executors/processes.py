"""The processes of this host, as ``kill(pid, 0)`` and /proc see them: is a pid still the process it was, and
which processes are left in a run's session.

The local executor uses it to re-attach to a run and to clean up after one, the service's store to tell a dead
dispatcher on this host. It imports neither torch nor ray, nor anything of the service.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ...; None when unreadable."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When the process started, in clock ticks after boot (with the pid, it names one process for good)."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def alive(pid: int, started: int | None = None) -> bool:
    """True when ``pid`` runs and is no zombie, and (given ``started``) is the process that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = stat_fields(pid)
    if fields is None:
        return not PROC.is_dir()  # no procfs: trust kill(0)
    if fields[0] in ("Z", "X"):
        return False
    return started is None or start_time(pid) == started


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group and session are ``pgid`` (a run's own session)."""
    if not PROC.is_dir():
        return []
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        if fields and len(fields) > 3 and fields[2] == str(pgid) and fields[3] == str(pgid) and fields[0] not in "ZX":
            members.append(int(entry.name))
    return members
