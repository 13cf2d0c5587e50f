"""Progress on a non-terminal stderr: lines for long stages with elapsed time and ETA, nothing for short ones."""

from __future__ import annotations

import itertools

import pytest

from onnxmpq import progress


@pytest.fixture(autouse=True)
def not_quiet(monkeypatch):
    monkeypatch.setattr(progress, "QUIET", False)  # an earlier in-process `-q` run leaves it set


def test_a_short_stage_prints_nothing(capsys):
    with progress.bar("calibrate", 10) as advance:
        advance(10)
    assert capsys.readouterr().err == ""


def test_a_long_stage_prints_elapsed_and_eta_then_a_closing_line(capsys, monkeypatch):
    clock = itertools.count(0.0, 10.0)  # each reading of the clock is 10 s after the last
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with progress.bar("sensitivity", 4, unit="unit") as advance:
        for _ in range(4):
            advance(1)
    lines = capsys.readouterr().err.splitlines()
    # start at 0 s; advances read the clock at 10, 20, 30 (a line: 3 of 4 done after 30 s) and 40
    assert lines == ["sensitivity: 3/4 units, 30 s, ETA 10 s", "sensitivity: 4 units in 50.0 s"]


def test_quiet_silences_the_lines(capsys, monkeypatch):
    clock = itertools.count(0.0, 100.0)
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(progress, "QUIET", True)
    with progress.bar("gptq", 3, unit="layer") as advance:
        advance(3)
    assert capsys.readouterr().err == ""


def test_timings_record_each_stage_even_when_quiet(monkeypatch):
    import time

    from onnxmpq import progress

    monkeypatch.setattr(progress, "QUIET", True)
    with progress.timings() as stages:
        with progress.bar("solve (ilp)", 1) as advance:
            time.sleep(0.02)
            advance(1)
        for _ in range(2):
            with progress.bar("verify", 1):
                time.sleep(0.01)
    assert set(stages) == {"solve", "verify"}
    assert stages["solve"] >= 0.02 and stages["verify"] >= 0.02
    with progress.bar("write", 1):
        pass
    assert "write" not in stages  # only while the block is active
