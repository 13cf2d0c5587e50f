"""Staging folders: every file onnxmpq writes is made in a fresh folder beside its destination and
renamed into place, so a destination is replaced only by a complete file.

A staging folder is `.onnxmpq-<host>-<pid>-<start>-<random>` (mkdtemp: created exclusively, mode 0700):
<start> is the writing process's start time in clock ticks since boot (/proc/<pid>/stat, field 22) and
<host> 8 hex digits of sha256(hostname, boot id, pid namespace), the scope in which a pid and a start
time name one process (a folder on NFS or a volume shared by containers is seen from other hosts and
namespaces too). A later run removes a staging folder in the folder it writes to only when the name
carries its own <host>, the folder is a real directory owned by this user, and no process <pid> with
that start time is alive (it was killed). Without /proc nothing can be proved, and nothing is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from onnxmpq.errors import OnnxmpqError

PREFIX = ".onnxmpq-"
_NAME = re.compile(r"^\.onnxmpq-([0-9a-f]{8})-(\d+)-(\d+)-[A-Za-z0-9_]+$")


def host_tag() -> str:
    """8 hex digits naming this host, boot and pid namespace (see the module docstring)."""
    parts = [socket.gethostname()]
    sources: tuple[Callable[[], str], ...] = (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                                              lambda: os.readlink("/proc/self/ns/pid"))
    for source in sources:
        try:
            parts.append(source())
        except OSError:
            parts.append("?")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def start_time(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces and ")"
    return int(fields[19]) if len(fields) > 19 else None


def remove_stale(folder: Path) -> list[Path]:
    """Removes the dead staging folders in `folder` (see the module docstring); returns them."""
    if start_time(os.getpid()) is None:
        return []
    host = host_tag()
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = _NAME.match(entry.name)
        if not match:
            continue
        try:
            info = os.lstat(entry)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        pid, started = int(match.group(2)), int(match.group(3))
        if match.group(1) != host or pid == os.getpid() or start_time(pid) == started:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def folder(path: Path) -> Iterator[Path]:
    """A fresh staging folder beside `path`, removed on exit however the block ends."""
    parent = path.parent
    if not parent.is_dir():
        raise OnnxmpqError(f"output folder {str(parent)!r} does not exist.", "create it first or choose another path.")
    remove_stale(parent)
    tmp = None
    try:
        try:
            prefix = f"{PREFIX}{host_tag()}-{os.getpid()}-{start_time(os.getpid()) or 0}-"
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        except OSError as exc:
            raise OnnxmpqError(f"cannot write in {str(parent)!r}: {exc.strerror}.", "choose a writable folder.") from None
        yield tmp
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
