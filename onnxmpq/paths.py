"""The files one command reads and writes, checked before any work starts: nothing it writes may be a
file it reads, or another file it writes.

Two paths name the same file when they resolve to the same place through symbolic links and `..`
(`Path.resolve`), or when both exist and are one inode (`os.path.samefile`: hard links, bind mounts,
case-insensitive file systems). Roles are the words the error names, e.g. "--report" or "the report
folder's report.json", so a user sees which two options collide.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from onnxmpq.errors import OnnxmpqError

PathLike = str | os.PathLike[str]


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when `a` and `b` are one file (see the module docstring)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def check_writes(writes: Mapping[str, PathLike | None], reads: Mapping[str, PathLike | None]) -> None:
    """Refuses a run whose written files (role -> path; None: not written; a model's `NAME.data` beside
    it included) meet its read files, or each other, or lie in a folder that does not exist."""
    out = {role: Path(p) for role, p in writes.items() if p is not None}
    into = {role: Path(p) for role, p in reads.items() if isinstance(p, (str, os.PathLike))}  # not a reader object
    sides = {f"{role}'s external data": path.with_name(path.name + ".data")  # a model over 2 GB writes it
             for role, path in out.items() if path.suffix == ".onnx"}
    for role, path in {**out, **sides}.items():
        for other, source in into.items():
            if same_file(path, source):
                raise OnnxmpqError(f"{role} {str(path)!r} is the {other} {str(source)!r}; writing it would "
                                   "overwrite an input.", "write to a new path; onnxmpq never overwrites what it reads.")
    seen: list[tuple[str, Path]] = []
    for role, path in out.items():
        for other, earlier in seen:
            if same_file(path, earlier):
                raise OnnxmpqError(f"{other} and {role} are the same file {str(path)!r}.",
                                   "give each output its own path.")
        seen.append((role, path))
        for side_role, side in sides.items():
            if same_file(path, side):
                raise OnnxmpqError(f"{side_role} and {role} are the same file {str(path)!r}.",
                                   "give each output its own path.")
        if path.is_dir():
            raise OnnxmpqError(f"{role} {str(path)!r} is a folder.", "give a file path.")
        if not path.parent.is_dir():
            raise OnnxmpqError(f"{role}: folder {str(path.parent)!r} does not exist.",
                               "create it first or choose another path.")


def check_new_folder(path: PathLike, role: str = "--report-dir") -> None:
    """A folder to write into: it may exist as a folder or be creatable (no file on its way)."""
    path = Path(path)
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OnnxmpqError(f"cannot make folder {str(path)!r} for {role}: {str(existing)!r} is a file.",
                           f"choose another {role}.")


def folder_files(folder: PathLike | None, names: tuple[str, ...], role: str) -> dict[str, Path]:
    """The files a command will write into `folder`, by role; none when the folder does not exist yet
    (a new folder cannot hold an input)."""
    if folder is None or not Path(folder).is_dir():
        return {}
    return {f"the {role} file {name}": Path(folder) / name for name in names}


MAX_SIDE_FILE = 64 * 2 ** 20  # a JSON or YAML file onnxmpq reads whole (allocations, profiles, configs, caches)


def kind(path: PathLike) -> str:
    """What is at `path`, in words: "a file", "a folder", "a FIFO", ..., or "nothing"."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "nothing"
    for test, word in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return word
    return "not a regular file"


def regular_file(path: PathLike, what: str, hint: str) -> Path:
    """`path` if it is a regular file (through links); else an error saying what is there instead."""
    found = kind(path)
    if found == "nothing":
        raise OnnxmpqError(f"{what} {str(path)!r} does not exist.", hint)
    if found != "a file":
        raise OnnxmpqError(f"{what} {str(path)!r} is {found}, not a regular file.", hint)
    return Path(path)


def read_regular(path: PathLike, what: str, hint: str, limit: int = MAX_SIDE_FILE) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Opened non-blocking and checked with fstat
    on the open descriptor, so a FIFO or device put there (even after a check) never blocks the run."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise OnnxmpqError(f"{what} {str(path)!r} does not exist.", hint) from None
    except OSError as exc:
        raise OnnxmpqError(f"cannot open {what} {str(path)!r}: {exc.strerror}.", hint) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise OnnxmpqError(f"{what} {str(path)!r} is {kind(path)}, not a regular file.", hint)
    with os.fdopen(fd, "rb") as stream:
        if info.st_size > limit:
            raise OnnxmpqError(f"{what} {str(path)!r} is {info.st_size:,} bytes, more than the {limit:,} onnxmpq "
                               "reads for such a file.", hint)
        try:
            return stream.read(limit + 1)[:limit]
        except OSError as exc:
            raise OnnxmpqError(f"cannot read {what} {str(path)!r}: {exc.strerror}.", hint) from None
