"""Linux /proc helpers for tests that check which processes listen where (Ray's and Serve's
sockets on loopback only): a process tree, and the listening TCP sockets of some processes."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple


class ListeningSocket(NamedTuple):
    pid: int
    table: str  # "tcp" or "tcp6"
    address: str  # "ADDR:PORT" in hex, as /proc/net/tcp{,6} writes it


def descendants(root: int) -> set[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def listening_sockets(pids: Iterable[int] | None = None, port: int | None = None) -> list[ListeningSocket]:
    """The listening TCP sockets held by `pids` (None: every process), on `port` (None: any)."""
    inodes: dict[str, tuple[str, str]] = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and (port is None or int(f[1].rsplit(":", 1)[1], 16) == port):  # LISTEN
                inodes[f[9]] = (table, f[1])
    if pids is None:
        pids = (int(d) for d in os.listdir("/proc") if d.isdigit())
    found = []
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        found += [ListeningSocket(pid, *inodes[ln[8:-1]]) for ln in links
                  if ln.startswith("socket:[") and ln[8:-1] in inodes]
    return found
