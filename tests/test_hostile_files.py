"""The second hostile corpus (issue 14): decoders, links, paths that collide, malformed side files.

Each case builds its hostile file in tmp_path and runs the CLI in-process. The contract: exit 1 with one
line naming the problem (no traceback), no input file changed, and nothing written through a link.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import EpsImagePlugin, Image

from conftest import build_cnn
from onnxmpq.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, message: str) -> None:
    assert code == 1, err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 2, err


@pytest.fixture()
def cnn(tmp_path) -> tuple[Path, Path]:
    """The conftest CNN (x: N,3,8,8) and 8 calibration samples."""
    model, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(build_cnn(), model)
    np.savez(calib, x=np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32))
    return model, calib


def snapshot(*paths: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


# --- decoders ----------------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, before_idat: bytes = b"") -> bytes:
    """A PNG whose header claims width x height RGB pixels; a few rows of real data."""
    rows = b"".join(b"\x00" + b"\x00" * (3 * width) for _ in range(min(height, 4)))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + before_idat + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))


def real_png() -> bytes:
    """A 32x32 RGB noise PNG written by Pillow."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def test_a_postscript_file_named_png_never_reaches_ghostscript(cnn, tmp_path, capsys, monkeypatch):
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self) or 1 / 0)
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(EPS)
    code, _, err = run(capsys, "quantize", cnn[0], "-o", tmp_path / "q.onnx", "--calib", folder, "-w", "8", "-a", "8")
    assert_refused(code, err, "a.png' is not a JPEG, PNG, BMP or WebP image")
    assert opened == []  # Pillow's EPS plugin (which shells out to Ghostscript) was never tried
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("name, data, message", [
    ("bomb.png", png_bytes(20000, 20000), "is too large to decode (Image size (400000000 pixels)"),
    ("wide.png", png_bytes(9000, 9000), "claims 9000x9000 pixels"),  # under Pillow's own bomb limit
    ("text.png", png_bytes(8, 8, _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * 2 ** 24, 9))),
     "cannot be decoded (ValueError: Decompressed data too large"),
    ("cut.png", real_png()[:-40], "cannot be decoded"),
], ids=["header-bomb", "big-header", "text-chunk-bomb", "truncated"])
def test_image_bombs_and_broken_images_are_one_line(cnn, tmp_path, capsys, name, data, message):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / name).write_bytes(data)
    code, _, err = run(capsys, "quantize", cnn[0], "-o", tmp_path / "q.onnx", "--calib", folder, "-w", "8", "-a", "8")
    assert_refused(code, err, message)


# --- links and temporary files ------------------------------------------------------------------------

def test_report_dir_never_writes_through_a_planted_link(cnn, tmp_path, capsys):
    report = tmp_path / "R"
    report.mkdir()
    victims = [tmp_path / "victim1.txt", tmp_path / "victim2.txt", tmp_path / "victim3.txt"]
    for v in victims:
        v.write_text("keep me")
    (report / ".report.html.tmp").symlink_to(victims[0])
    (report / "report.html").symlink_to(victims[1])
    (report / "report.json").symlink_to(victims[2])
    code, _, err = run(capsys, "quantize", cnn[0], "-o", tmp_path / "q.onnx", "--calib", cnn[1], "-w", "8", "-a", "8",
                       "--report-dir", report, "--no-verify")
    assert code == 0, err
    assert [v.read_text() for v in victims] == ["keep me"] * 3
    for name in ("report.html", "report.json"):
        assert not (report / name).is_symlink() and (report / name).stat().st_size > 100
    assert not [p for p in report.iterdir() if p.name.startswith(".onnxmpq-")]


def test_written_files_replace_a_link_instead_of_following_it(cnn, tmp_path, capsys):
    victim = tmp_path / "victim.onnx"
    victim.write_bytes(b"keep me")
    out = tmp_path / "q.onnx"
    out.symlink_to(victim)
    code, _, err = run(capsys, "quantize", cnn[0], "-o", out, "--calib", cnn[1], "-w", "8", "-a", "8", "--no-verify")
    assert code == 0, err
    assert victim.read_bytes() == b"keep me"
    assert not out.is_symlink()
    onnx.checker.check_model(str(out), full_check=True)


# --- a written path that is a read one ----------------------------------------------------------------

@pytest.fixture()
def allocation(cnn, tmp_path, capsys) -> Path:
    path = tmp_path / "A.json"
    code, _, err = run(capsys, "quantize", cnn[0], "-o", tmp_path / "first.onnx", "--calib", cnn[1], "-w", "4",
                       "-a", "8", "--rounding", "nearest", "--report", path, "--no-verify")
    assert code == 0, err
    return path


def test_report_onto_the_allocation_input(cnn, allocation, tmp_path, capsys):
    before = snapshot(allocation)
    code, _, err = run(capsys, "quantize", cnn[0], "-o", tmp_path / "q.onnx", "--calib", cnn[1],
                       "--allocation", allocation, "--report", allocation)
    assert_refused(code, err, "is the --allocation")
    assert snapshot(allocation) == before and not (tmp_path / "q.onnx").exists()


def test_report_dir_holding_the_allocation_input(cnn, allocation, tmp_path, capsys):
    folder = tmp_path / "R"
    folder.mkdir()
    inside = folder / "report.json"
    os.replace(allocation, inside)
    before = snapshot(inside)
    code, _, err = run(capsys, "quantize", cnn[0], "-o", tmp_path / "q.onnx", "--calib", cnn[1],
                       "--allocation", inside, "--report-dir", folder)
    assert_refused(code, err, "the --report-dir file report.json")
    assert snapshot(inside) == before


def test_report_hard_linked_to_the_calibration_file(cnn, tmp_path, capsys):
    link = tmp_path / "report.json"
    os.link(cnn[1], link)
    before = snapshot(cnn[1])
    code, _, err = run(capsys, "quantize", cnn[0], "-o", tmp_path / "q.onnx", "--calib", cnn[1], "-w", "8",
                       "--report", link)
    assert_refused(code, err, "is the --calib")
    assert snapshot(cnn[1]) == before


def test_sweep_models_landing_on_the_input_model(cnn, tmp_path, capsys):
    model = tmp_path / "net.4.onnx"
    os.replace(cnn[0], model)
    before = snapshot(model)
    code, _, err = run(capsys, "quantize", model, "-o", tmp_path / "net.onnx", "--calib", cnn[1],
                       "--sweep", "avg-bits=3:5:1", "--sweep-models", "--bits", "2,4,8")
    assert_refused(code, err, "the sweep model at 4")
    assert snapshot(model) == before


def test_sweep_json_onto_the_allocation_input(cnn, allocation, tmp_path, capsys):
    target = tmp_path / "net.sweep.json"
    os.replace(allocation, target)
    before = snapshot(target)
    code, _, err = run(capsys, "quantize", cnn[0], "-o", tmp_path / "net.onnx", "--calib", cnn[1],
                       "--allocation", target, "--sweep", "avg-bits=3:5:1")
    assert_refused(code, err, "the sweep's JSON")
    assert snapshot(target) == before


def test_sensitivity_plot_onto_its_output(cnn, tmp_path, capsys):
    out = tmp_path / "s.json"
    code, _, err = run(capsys, "sensitivity", cnn[0], "--calib", cnn[1], "-o", out, "--plot", out)
    assert_refused(code, err, "are the same file")


# --- malformed side files -----------------------------------------------------------------------------

@pytest.mark.parametrize("entry, message", [
    ({"weight_bits": "4", "act_bits": 8}, "weight_bits '4'"),
    ({"weight_bits": 4, "act_bits": 8.5}, "act_bits 8.5"),
    ({"weight_bits": True, "act_bits": 8}, "weight_bits True"),
    ({"weight_bits": 40, "act_bits": 8}, "weight_bits 40"),
], ids=["string", "fraction", "bool", "too-wide"])
def test_allocation_with_bad_numbers(cnn, tmp_path, capsys, entry, message):
    path = tmp_path / "alloc.json"
    path.write_text(json.dumps({"layers": {"conv1": entry}}))
    code, _, err = run(capsys, "quantize", cnn[0], "-o", tmp_path / "q.onnx", "--calib", cnn[1], "-w", "8",
                       "--allocation", path)
    assert_refused(code, err, message)
