"""The files one command reads and writes, checked before any work starts: nothing it writes may be a
file it reads, or another file it writes.

Two paths name the same file when they resolve to the same place through symbolic links and `..`
(`Path.resolve`), or when both exist and are one inode (`os.path.samefile`: hard links, bind mounts,
case-insensitive file systems). Roles are the words the error names, e.g. "--report" or "the report
folder's report.json", so a user sees which two options collide.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from onnxmpq.errors import OnnxmpqError

PathLike = str | os.PathLike


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
    """Refuses a run whose written files (role -> path; None: not written) meet its read files, or each
    other, or lie in a folder that does not exist."""
    out = {role: Path(p) for role, p in writes.items() if p is not None}
    into = {role: Path(p) for role, p in reads.items() if p is not None}
    for role, path in out.items():
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
