"""The processes a command under test started, read from /proc while it runs.

Tests that run a whole site (`hil demo`, `hil soak`) check what it started and that all of
it is gone afterwards. Two facts of /proc shape this: PIDs wrap around (pid_max can be
32768), so a process is known by its PID and start time; and a process that is exiting (a
zombie not yet reaped) reads with an empty command line, so a watch keeps what it was.
"""

from __future__ import annotations

import os

Key = tuple[int, str]  # (pid, start time)


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int) -> dict[Key, str]:
    """Every process below `root` now, with its command line ("" while it exits)."""
    stats = {int(n): st for n in os.listdir("/proc") if n.isdigit() and (st := _stat(int(n))) is not None}
    found: dict[Key, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, st in stats.items():
            key = (pid, st[19])  # field 22 of stat: start time
            if st[1] == str(parent) and key not in found:
                found[key] = _cmdline(pid)
                frontier.append(pid)
    return found


def running(key: Key) -> bool:
    """The same process (not a new one that got the PID) is still there, and not a zombie."""
    st = _stat(key[0])
    return st is not None and st[19] == key[1] and st[0] != "Z"


class ProcessWatch:
    """Everything seen below one root over a run, each process with the last command line it
    showed (a process read between its fork and exec shows its parent's; an exiting one none)."""

    def __init__(self) -> None:
        self.seen: dict[Key, str] = {}

    def scan(self, root: int) -> None:
        for key, cmd in descendants(root).items():
            if cmd or key not in self.seen:
                self.seen[key] = cmd

    def commands(self) -> list[str]:
        return list(self.seen.values())

    def still_running(self) -> dict[Key, str]:
        return {key: cmd for key, cmd in self.seen.items() if running(key)}
