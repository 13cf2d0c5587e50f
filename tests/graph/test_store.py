"""Tests of onnxmpq.graph.store.CutStore: per-batch arrays in RAM up to a budget, spilled beyond it."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from onnxmpq.errors import OnnxmpqError
from onnxmpq.graph.store import CutStore


def batches(n=4, rows=3):
    rng = np.random.default_rng(0)
    return [{"a": rng.normal(size=(rows, 5)).astype(np.float32), "b": np.arange(rows, dtype=np.int64) + i}
            for i in range(n)]


def batch_bytes(batch):
    return sum(v.nbytes for v in batch.values())


def test_under_the_budget_nothing_spills_and_the_arrays_are_the_same_objects():
    data = batches()
    store = CutStore(data, budget=1 << 20)
    assert not store.spilled and store.folder is None
    assert store.ram_bytes == sum(batch_bytes(b) for b in data)
    assert all(store[i]["a"] is data[i]["a"] for i in range(len(data)))


def test_over_the_budget_the_overflow_spills_and_reads_back_equal():
    data = batches()
    one = batch_bytes(data[0])
    store = CutStore(data, budget=2 * one)  # two batches fit
    assert store.spilled and store.folder is not None and store.folder.is_dir()
    assert store.ram_bytes == 2 * one
    for i, batch in enumerate(data):
        assert set(store[i]) == set(batch)
        for name, value in batch.items():
            np.testing.assert_array_equal(store[i][name], value)
            assert store[i][name].dtype == value.dtype
    # the two in RAM and the one read back last, never more
    assert store.peak_resident <= 3 * one
    assert store.resident_bytes <= 3 * one


def test_put_and_drop_follow_the_cut_on_disk_and_in_ram():
    data = batches()
    store = CutStore(data, budget=0)  # everything on disk
    for i in range(len(store)):
        store.put(i, {"c": np.full((3, 2), float(i), np.float32)}, forget=["a"])
    assert store.names() == {"b", "c"}
    store.drop(["b"])
    assert store.names() == {"c"}
    assert len(list(store.folder.iterdir())) == len(data)  # one file per batch and tensor left
    for i in range(len(store)):
        np.testing.assert_array_equal(store[i]["c"], np.full((3, 2), float(i), np.float32))
    assert store.peak_resident <= max(batch_bytes(b) for b in data) + 3 * 2 * 4
    assert store.ram_bytes == 0


def test_a_batch_that_outgrows_the_budget_moves_to_disk():
    data = batches(n=2)
    one = batch_bytes(data[0])
    store = CutStore(data, budget=2 * one)
    assert not store.spilled
    store.put(1, {"big": np.ones((100,), np.float64)})
    assert store.spilled and store.ram_bytes == one
    np.testing.assert_array_equal(store[1]["a"], data[1]["a"])
    np.testing.assert_array_equal(store[1]["big"], np.ones(100))


def test_the_folder_is_removed_on_close_and_when_dropped():
    store = CutStore(batches(), budget=0)
    folder = store.folder
    store.close()
    assert not folder.exists()
    store = CutStore(batches(), budget=0)
    folder = store.folder
    del store
    gc.collect()
    assert not folder.exists()


def test_the_folder_is_removed_when_a_run_fails():
    folders = []

    def failing():
        store = CutStore(batches(), budget=0)
        folders.append(store.folder)
        raise RuntimeError("a probe failed")

    with pytest.raises(RuntimeError):
        failing()
    gc.collect()
    assert folders and not folders[0].exists()


def test_a_full_disk_is_a_user_error(monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(OnnxmpqError, match="No space left") as caught:
        CutStore(batches(), budget=0)
    assert "TMPDIR" in caught.value.hint
