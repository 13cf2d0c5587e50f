"""Per-batch tensors of a calibration set, in RAM up to a byte budget and spilled to disk beyond it.

A `CutStore` holds one dict of arrays per batch (the values at an engine cut). A batch stays in RAM
while the bytes of the batches in RAM, it included, fit `budget`; a batch that does not fit is written
to a private temporary folder (`tempfile.mkdtemp`, one .npy file per tensor) and read back when asked
for, one batch at a time: the store keeps at most the last batch it read besides the ones in RAM. The
folder is removed when the store is closed or dropped, or when the process exits (`weakref.finalize`).

Memory: min(budget, the cut's bytes) + one batch's cut.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from onnxmpq.errors import OnnxmpqError

Batch = dict[str, np.ndarray]


class CutStore(Sequence[Batch]):
    """One dict of arrays per batch; `store[i]` is batch i (read from disk when spilled), `put` adds
    tensors to a batch, `drop` forgets tensors in every batch (see the module docstring)."""

    def __init__(self, batches: Iterable[Mapping[str, np.ndarray]], budget: int):
        self.budget = budget
        self._ram: list[Batch | None] = []      # None: the batch is on disk
        self._files: list[dict[str, Path]] = []  # per spilled batch, tensor -> its .npy file
        self._folder: Path | None = None
        self._cleanup: Callable[[], object] | None = None
        self._loaded: tuple[int, Batch] | None = None  # the last spilled batch read back
        self._count = 0
        self.ram_bytes = 0        # bytes of the batches held in RAM
        self.peak_resident = 0    # most bytes ever held: the batches in RAM and the last one read back
        self.spilled_bytes = 0    # bytes written to disk in all
        for batch in batches:
            self._ram.append({})
            self._files.append({})
            self.put(len(self._ram) - 1, batch)

    def __len__(self) -> int:
        return len(self._ram)

    def __getitem__(self, i: int) -> Batch:  # type: ignore[override]  # batches are indexed, never sliced
        held = self._ram[i]
        if held is not None:
            return held
        if self._loaded is None or self._loaded[0] != i:
            self._loaded = None  # the previous one is let go before the next is read
            self._loaded = (i, {name: np.load(path) for name, path in self._files[i].items()})
            self._note()
        return self._loaded[1]

    def __iter__(self) -> Iterator[Batch]:
        return (self[i] for i in range(len(self)))

    @property
    def spilled(self) -> bool:
        """Whether any batch is on disk."""
        return any(held is None for held in self._ram)

    @property
    def resident_bytes(self) -> int:
        """Bytes the store holds now: the batches in RAM and the last spilled batch read back."""
        loaded = sum(v.nbytes for v in self._loaded[1].values()) if self._loaded else 0
        return self.ram_bytes + loaded

    def names(self) -> set[str]:
        """The tensors held (every batch holds the same ones)."""
        return set(self[0]) if self._ram else set()

    def put(self, i: int, values: Mapping[str, np.ndarray], forget: Iterable[str] = ()) -> None:
        """Forgets the tensors `forget` of batch i, then adds (or replaces) `values`; the batch goes to
        disk when it no longer fits the budget."""
        self._forget(i, forget)
        held = self._ram[i]
        if held is not None:
            size = sum(np.asarray(v).nbytes for v in values.values()) - sum(held[n].nbytes for n in values if n in held)
            if self.ram_bytes + size <= self.budget:
                held.update((n, np.asarray(v)) for n, v in values.items())
                self.ram_bytes += size
                self._note()
                return
            self._ram[i] = None
            self.ram_bytes -= sum(v.nbytes for v in held.values())
            values = {**held, **values}
        for name, value in values.items():
            self._write(i, name, np.asarray(value))
        if self._loaded is not None and self._loaded[0] == i:
            self._loaded[1].update((n, np.asarray(v)) for n, v in values.items())
            self._note()

    def drop(self, names: Iterable[str]) -> None:
        """Forgets `names` in every batch (their files are deleted)."""
        names = set(names)
        for i in range(len(self)):
            self._forget(i, names)

    def _forget(self, i: int, names: Iterable[str]) -> None:
        held, files = self._ram[i], self._files[i]
        for name in names:
            if held is not None and name in held:
                self.ram_bytes -= held.pop(name).nbytes
            path = files.pop(name, None)
            if path is not None:
                path.unlink(missing_ok=True)
            if self._loaded is not None and self._loaded[0] == i:
                self._loaded[1].pop(name, None)

    def close(self) -> None:
        """Removes the spill folder and forgets every batch."""
        if self._cleanup is not None:
            self._cleanup()
        self._ram, self._files, self._loaded, self.ram_bytes = [], [], None, 0

    @property
    def folder(self) -> Path | None:
        """The spill folder, once a batch has gone to disk."""
        return self._folder

    def _write(self, i: int, name: str, value: np.ndarray) -> None:
        folder = self._ensure_folder()
        self._count += 1
        path = folder / f"{i}_{self._count}.npy"
        try:
            np.save(path, value, allow_pickle=False)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise OnnxmpqError(f"cannot spill calibration activations to {folder}: {exc.strerror or exc}.",
                               "free space there, point TMPDIR at a folder with room, or use fewer calibration "
                               "samples.") from None
        old = self._files[i].get(name)
        if old is not None:
            old.unlink(missing_ok=True)
        self._files[i][name] = path
        self.spilled_bytes += value.nbytes

    def _ensure_folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="onnxmpq-cut-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._folder), ignore_errors=True)
        return self._folder

    def _note(self) -> None:
        self.peak_resident = max(self.peak_resident, self.resident_bytes)
