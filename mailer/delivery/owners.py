"""Lease owners: whether the process named by a lease is gone, so its claims can be taken now.

A worker leases rows under the name ``host:pid`` (``mailer.delivery.worker.worker_name``). A worker
on the same host can tell, without waiting for the lease to run out, that the owner is dead:
``kill(pid, 0)`` finds no such process, or /proc shows it ended and not yet reaped (a sending
process killed beside its parent). A pid can be reused (``/proc/sys/kernel/pid_max`` is
32,768 on many machines), so a live process under that pid is compared by start time with the
last moment the owner is known to have been alive (its last write to the rows it holds): a
process that started after that moment is another one, and the owner is gone.

Bounds: process start times are read from Linux's ``/proc`` (to about a second, from the
boot time in ``/proc/stat``), so a pid reused within ``START_SLACK`` of the owner's last write
is taken for the owner, and its claims wait for their lease to end (``[smtp].lease_seconds``).
Elsewhere only the liveness test applies. Owners on another host are never judged: their rows
return when their lease ends. Two hosts, or two containers with separate pid namespaces, must
therefore not share a host name.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

# How far the start time of a process read from /proc may be off (the boot time is whole
# seconds, and drifts with clock adjustments).
START_SLACK = timedelta(seconds=2)
OWNER_MAX = 64  # the width of deliveries.lease_owner


def local_pid(owner: str, hostname: str | None = None) -> int | None:
    """The pid in ``owner`` if it names a process of this host, else None (another host, or a
    name cut at the column's width, whose pid cannot be trusted)."""
    prefix = (hostname if hostname is not None else socket.gethostname()) + ":"
    if not owner.startswith(prefix) or len(owner) >= OWNER_MAX:
        return None
    pid = owner[len(prefix) :]
    return int(pid) if pid.isascii() and pid.isdigit() else None


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and
    parentheses): [state, ppid, ...]; None where there is no such file."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_started(pid: int) -> datetime | None:
    """When process ``pid`` started (UTC), from /proc; None where /proc cannot tell."""
    fields = _stat(pid)
    return None if fields is None else _started(fields)


def _started(fields: list[str]) -> datetime | None:
    """The start time in ``fields`` (``_stat``'s), as a UTC datetime; None without a boot time."""
    boot = _boot_time()
    if boot is None:
        return None
    ticks = int(fields[19])  # field 22 of the file: starttime, in clock ticks after boot
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), UTC)


def _boot_time() -> int | None:
    """When this machine booted (``btime`` in /proc/stat, whole seconds).

    Read at each look, not once: it moves with adjustments of the clock (see START_SLACK)."""
    try:
        return next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError):
        return None


def owner_gone(owner: str, *, alive_at: datetime, hostname: str | None = None) -> bool:
    """Whether the process that holds leases as ``owner`` has certainly ended.

    ``alive_at``: a moment the owner was alive (its latest write to the rows it holds).
    """
    pid = local_pid(owner, hostname)
    if pid is None or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, under another user
    fields = _stat(pid)
    if fields is None:
        return False
    if fields[0] in ("Z", "X"):
        return True  # it has ended; its parent has not reaped it yet (a killed helper)
    started = _started(fields)
    return started is not None and started > alive_at + START_SLACK
