"""The second hostile corpus (issue 14): decoders, links, paths that collide, malformed side files.

Each case builds its hostile file in tmp_path and runs the CLI in-process. The contract: exit 1 with one
line naming the problem (no traceback), no input file changed, and nothing written through a link.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import build_cnn
from PIL import EpsImagePlugin, Image

from onnxmpq.cli.main import main


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


# --- special files, size limits, YAML ----------------------------------------------------------------

def _watchdog(seconds: int = 20):
    def fire(signum, frame):
        raise TimeoutError(f"hung for {seconds} s")
    signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)


@pytest.fixture()
def no_hang():
    _watchdog()
    yield
    signal.alarm(0)


@pytest.mark.parametrize("which", ["model", "calib"])
def test_a_fifo_or_folder_where_a_file_belongs(cnn, tmp_path, capsys, no_hang, which):
    fifo = tmp_path / ("p.onnx" if which == "model" else "p.npz")
    os.mkfifo(fifo)
    args = [fifo, "--calib", cnn[1]] if which == "model" else [cnn[0], "--calib", fifo]
    code, _, err = run(capsys, "quantize", *args[:1], "-o", tmp_path / "q.onnx", *args[1:], "-w", "8", "-a", "8")
    assert_refused(code, err, "is a FIFO (named pipe), not a")
    folder = tmp_path / "d.onnx"
    folder.mkdir()
    code, _, err = run(capsys, "inspect", folder)  # click's own path check: a usage error
    assert code in (1, 2) and "d.onnx' is a directory" in err and "Traceback" not in err, err


def test_a_fifo_as_allocation_or_profile_never_blocks(cnn, tmp_path, capsys, no_hang):
    fifo = tmp_path / "a.json"
    os.mkfifo(fifo)
    code, _, err = run(capsys, "quantize", cnn[0], "-o", tmp_path / "q.onnx", "--calib", cnn[1], "--allocation", fifo)
    assert_refused(code, err, "is a FIFO (named pipe), not a regular file")
    yml = tmp_path / "p.yaml"
    os.mkfifo(yml)
    code, _, err = run(capsys, "check", cnn[0], "--profile", yml)
    assert_refused(code, err, "is a FIFO (named pipe), not a regular file")


def _cache_entry(tmp_path: Path, cnn, capsys) -> Path:
    cache = tmp_path / "cache"
    code, _, err = run(capsys, "sensitivity", cnn[0], "--calib", cnn[1], "--bits", "4,8", "--cache", cache)
    assert code == 0, err
    [entry] = list(cache.glob("*.json"))
    return entry


def _rerun(tmp_path, cnn, capsys) -> tuple[int, str, str]:
    return run(capsys, "sensitivity", cnn[0], "--calib", cnn[1], "--bits", "4,8", "--cache", tmp_path / "cache",
               "--json")


def _rewrite(entry: Path, change) -> None:
    from onnxmpq.sensitivity.cache import _checksum
    data = json.loads(entry.read_text())
    change(data["tables"])
    data["checksum"] = _checksum(data["tables"])  # the checksum matches: only the contents are wrong
    entry.write_text(json.dumps(data))


@pytest.mark.parametrize("damage", ["fifo", "folder", "string-scores", "missing-candidate", "other-metric"])
def test_cache_entries_that_cannot_be_trusted_are_rebuilt(cnn, tmp_path, capsys, no_hang, damage):
    entry = _cache_entry(tmp_path, cnn, capsys)
    if damage in ("fifo", "folder"):
        entry.unlink()
        os.mkfifo(entry) if damage == "fifo" else entry.mkdir()
    elif damage == "string-scores":
        _rewrite(entry, lambda tables: tables[0]["layers"][0]["scores"].update({tables[0]["candidates"][0]: "big"}))
    elif damage == "missing-candidate":
        _rewrite(entry, lambda tables: tables[0]["layers"][0]["scores"].pop(tables[0]["candidates"][0]))
    else:
        _rewrite(entry, lambda tables: tables[0].update(metric="kl"))
    code, out, err = _rerun(tmp_path, cnn, capsys)
    assert code == 0, err
    assert "is unusable" in err or "not caching" in err
    table = json.loads(out)
    assert all(isinstance(v, float) for layer in table["layers"] for v in layer["scores"].values())


def _zip_member_damage(path: Path, how: str) -> None:
    """Damages the first member of a stored (uncompressed) .npz in place."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack("<HH", data[26:30])
    body = 30 + name_len + extra_len
    if how == "crc":
        data[body + 200] ^= 0xFF  # a payload byte: the CRC no longer matches
    elif how == "encrypted":
        data[6] |= 1
        central = data.rfind(b"PK\x01\x02")
        data[central + 8] |= 1
    elif how == "method":
        data[8] = 99
        data[data.rfind(b"PK\x01\x02") + 10] = 99
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["crc", "encrypted", "method", "deflate"])
def test_damaged_npz_members_are_one_line(cnn, tmp_path, capsys, how):
    calib = tmp_path / "bad.npz"
    x = np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32)
    if how == "deflate":
        np.savez_compressed(calib, x=x)
        data = bytearray(calib.read_bytes())
        for i in range(80, 400):
            data[i] = 0x55  # garbage inside the deflate stream
        calib.write_bytes(bytes(data))
    else:
        np.savez(calib, x=x)
        _zip_member_damage(calib, how)
    code, _, err = run(capsys, "quantize", cnn[0], "-o", tmp_path / "q.onnx", "--calib", calib, "-w", "8", "-a", "8")
    assert_refused(code, err, "bad.npz")
    assert not (tmp_path / "q.onnx").exists()


YAML_BOMBS = {
    "self-alias": "name: x\nops: &a\n  Conv: *a\n",
    "laughs": "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
    "deep": "ops: " + "[" * 5000 + "]" * 5000 + "\n",
}


@pytest.mark.parametrize("kind", list(YAML_BOMBS))
def test_yaml_alias_bombs_in_profiles_and_configs(cnn, tmp_path, capsys, no_hang, kind):
    profile = tmp_path / "p.yaml"
    profile.write_text(YAML_BOMBS[kind])
    code, _, err = run(capsys, "check", cnn[0], "--profile", profile)
    assert_refused(code, err, "p.yaml")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {cnn[0]}\noutput: {tmp_path / 'q.onnx'}\n" + YAML_BOMBS[kind].replace("name: x\n", ""))
    code, _, err = run(capsys, "run", config)
    assert_refused(code, err, "c.yaml")
    assert not (tmp_path / "q.onnx").exists()


def test_disk_full_while_writing_is_one_line(cnn, tmp_path):
    import resource
    import shutil
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))

    out = tmp_path / "q.onnx"
    exe = shutil.which("onnxmpq") or str(Path(sys.executable).with_name("onnxmpq"))
    done = subprocess.run([exe, "quantize", str(cnn[0]), "-o", str(out), "-w", "8", "-a", "float", "--no-verify"],
                          capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "File too large" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not out.exists() and not list(tmp_path.glob(".onnxmpq-*"))


def test_a_model_onnxruntime_would_not_load_is_never_written(cnn, tmp_path, capsys, monkeypatch):
    from onnxmpq.errors import OnnxmpqError
    from onnxmpq.graph import runtime

    real = runtime.session

    def old_runtime(model, threads=None, optimize=True, spin=True):  # an onnxruntime that predates the opset
        if not optimize:
            raise OnnxmpqError("onnxruntime cannot run the model: opset 21 is under development")
        return real(model, threads, optimize, spin)

    monkeypatch.setattr(runtime, "session", old_runtime)
    out = tmp_path / "q.onnx"
    code, _, err = run(capsys, "quantize", cnn[0], "-o", out, "-w", "8", "-a", "float", "--no-verify")
    assert_refused(code, err, "would not load in onnxruntime")
    assert not out.exists()


# --- staging folders left behind ----------------------------------------------------------------------

def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(cnn, tmp_path, capsys):
    import subprocess
    import sys

    from onnxmpq.write import staging

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = staging.start_time(child.pid)
    child.kill()
    child.wait()
    host = staging.host_tag()
    dead = tmp_path / f".onnxmpq-{host}-{child.pid}-{started}-abc123"
    dead.mkdir()
    (dead / "q.onnx").write_bytes(b"half a model")  # what SIGKILL mid-write leaves
    live = tmp_path / f".onnxmpq-{host}-{os.getppid()}-{staging.start_time(os.getppid())}-def456"
    live.mkdir()  # a running process's (our parent's) staging folder
    other = tmp_path / ".onnxmpq-notes"
    other.mkdir()  # not a staging name: not ours to remove
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    (tmp_path / f".onnxmpq-{host}-{child.pid}-{started}-link99").symlink_to(victim)  # a link is never followed
    elsewhere = tmp_path / f".onnxmpq-{'0' * 8 if host != '0' * 8 else '1' * 8}-{child.pid}-{started}-ghi789"
    elsewhere.mkdir()  # the same pid and start on another host or container sharing this folder: kept
    code, _, err = run(capsys, "quantize", cnn[0], "-o", tmp_path / "q.onnx", "-w", "8", "-a", "float", "--no-verify")
    assert code == 0, err
    assert not dead.exists()
    assert live.is_dir() and other.is_dir() and elsewhere.is_dir() and (victim / "keep.txt").read_text() == "keep"
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)


def test_an_interrupt_while_staging_is_cleaned_up_by_the_next_run(tmp_path):
    import subprocess
    import sys

    from onnxmpq.write import save

    script = (  # Ctrl-C lands right after mkdtemp made the folder, before onnxmpq holds its name
        "import sys, tempfile\n"
        "real = tempfile.mkdtemp\n"
        "def interrupted(*a, **k):\n"
        "    print(real(*a, **k)); raise KeyboardInterrupt\n"
        "tempfile.mkdtemp = interrupted\n"
        "from onnxmpq.write import save\n"
        "save.write_text('x', sys.argv[1])\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a.txt")], capture_output=True, text=True)
    assert done.returncode != 0 and "KeyboardInterrupt" in done.stderr
    left = Path(done.stdout.strip())
    assert left.is_dir() and left.parent == tmp_path  # the interrupted process left it behind ...
    save.write_text("y", tmp_path / "b.txt")
    assert not left.exists()  # ... and the next write into that folder removed it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt"]


# --- damaged models and metadata ---------------------------------------------------------------------

def _short_weight(proto: onnx.ModelProto) -> onnx.ModelProto:
    weight = next(t for t in proto.graph.initializer if t.name == "W2")
    data = onnx.numpy_helper.to_array(weight).tobytes()
    weight.ClearField("float_data")
    weight.raw_data = data[:100]
    return proto


def _empty_input(proto: onnx.ModelProto) -> onnx.ModelProto:
    proto.graph.node[0].input[0] = ""
    return proto


@pytest.mark.parametrize("damage, message", [
    (_short_weight, "tensor 'W2' (4x8x3x3, FLOAT) holds 100 bytes where its shape needs 1152"),
    (_empty_input, "node 'conv1' (Conv) has no tensor for its required input 0"),
], ids=["weight-shorter-than-dims", "empty-input-name"])
@pytest.mark.parametrize("command", ["quantize", "inspect", "check"])
def test_damaged_models_are_one_line(tmp_path, capsys, damage, message, command):
    path = tmp_path / "bad.onnx"
    onnx.save(damage(build_cnn()), path)
    args = {"quantize": ["quantize", path, "-o", tmp_path / "q.onnx", "-w", "8", "-a", "float"],
            "inspect": ["inspect", path], "check": ["check", path, "--profile", "int8-only"]}[command]
    code, _, err = run(capsys, *args)
    assert_refused(code, err, message)
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("value", ['[1, 2]', '{"conv1": "eight"}', '{"conv1": [8]}', '{"conv1": [true, 8]}', "{" * 3000,
                                   'not json'], ids=["list", "string", "short", "bool", "deep", "text"])
def test_malformed_onnxmpq_metadata_is_ignored_with_a_warning(cnn, tmp_path, capsys, value):
    out = tmp_path / "q.onnx"
    code, _, err = run(capsys, "quantize", cnn[0], "-o", out, "--calib", cnn[1], "-w", "4", "-a", "8",
                       "--rounding", "nearest", "--no-verify")
    assert code == 0, err
    proto = onnx.load(str(out))
    next(p for p in proto.metadata_props if p.key == "onnxmpq.layers").value = value
    onnx.save(proto, str(out))
    code, stdout, err = run(capsys, "inspect", out, "--json")
    assert code == 0 and "ignoring the model's onnxmpq.layers metadata" in err, err
    layers = {entry["name"]: entry for entry in json.loads(stdout)["layers"]}
    assert layers["conv1"]["weight_bits"] == 4  # read from the INT4 tensor type instead
    code, _, err = run(capsys, "check", out, "--profile", "npu-w4a8")
    assert code in (0, 2) and "Traceback" not in err, err


def test_the_path_checks_let_a_python_data_reader_through(cnn, tmp_path):
    """A reader object (get_next) as calibration data is not a path to check against the outputs."""
    from onnxmpq.pipeline import api

    class Reader:
        def __init__(self):
            self.rewind()

        def rewind(self):
            self.batches = iter([{"x": np.load(cnn[1])["x"][:4]}, {"x": np.load(cnn[1])["x"][4:]}])

        def get_next(self):
            return next(self.batches, None)

    report = api.quantize(cnn[0], tmp_path / "q.onnx", Reader(), weight_bits=8, act_bits=8, verify=False)
    assert report.file_bytes > 0
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)


def test_a_model_exported_at_batch_1_is_calibrated_verified_and_allocated(tmp_path, capsys):
    """Inputs and outputs with a static batch of 1: every stage feeds it batches of 1 (verification used
    to feed 64 and fail in onnxruntime)."""
    proto = build_cnn()
    for value in (proto.graph.input[0], proto.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 1
    path, calib = tmp_path / "b1.onnx", tmp_path / "c.npz"
    onnx.save(proto, path)
    np.savez(calib, x=np.random.default_rng(0).normal(size=(20, 3, 8, 8)).astype(np.float32))
    code, out, err = run(capsys, "quantize", path, "-o", tmp_path / "q.onnx", "--calib", calib, "-w", "8", "-a", "8")
    assert code == 0 and "verified on 4 held-out samples" in out, err
    code, out, err = run(capsys, "quantize", path, "-o", tmp_path / "m.onnx", "--calib", calib, "--budget", "avg-bits=6",
                         "--bits", "4,8", "--json")
    assert code == 0, err
    assert json.loads(out)["verification"]["samples"] == 4


def wrong_output_shape_model(declared, batch="N") -> onnx.ModelProto:
    """Conv -> Relu -> Reshape to [N, 8, -1] (the target's length computed at run time: Shape(r)[0 :
    rank(x) - 1] ++ [-1], so only data propagation knows the rank) -> Softmax -> y, declared `declared`
    while the graph computes [N, 8, 16]. It passes check_model(full_check=True) as given."""
    from conftest import arr, model, node, vi

    ints = lambda *v: np.array(v, np.int64)  # noqa: E731
    return model(
        [node("Conv", ["x", "W", "B"], ["c"], "conv", pads=[1, 1, 1, 1]),
         node("Relu", ["c"], ["r"], "relu"),
         node("Shape", ["r"], ["s"], "shape_r"), node("Shape", ["x"], ["sx"], "shape_x"),
         node("Gather", ["sx", "i1"], ["three"], "gather", axis=0), node("Sub", ["three", "one"], ["two"], "sub"),
         node("Slice", ["s", "zero", "two"], ["s01"], "slice"), node("Concat", ["s01", "m1"], ["shp"], "concat", axis=0),
         node("Reshape", ["r", "shp"], ["t"], "reshape"), node("Softmax", ["t"], ["y"], "softmax", axis=-1)],
        [vi("x", [batch, 3, 4, 4])], [vi("y", declared)],
        {"W": arr(1, 8, 3, 3, 3, scale=0.3), "B": arr(2, 8, scale=0.1), "i1": ints(1), "one": ints(1),
         "zero": ints(0), "m1": ints(-1)}, 17)


@pytest.mark.parametrize("declared", [["N", "K"], ["N", 7, "T"], [1, 8, 15]])
def test_a_wrongly_declared_output_shape_is_repaired_and_said(tmp_path, capsys, declared):
    """The loader's shape inference (with data propagation) used to store intermediate shapes that
    contradict the declared output, so the written model failed the checker: InternalError."""
    from onnxmpq.graph import model as graph

    static = declared[0] == 1
    proto = wrong_output_shape_model(declared, 1 if static else "N")
    onnx.checker.check_model(proto, full_check=True)
    path, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(proto, path)
    np.savez(calib, x=np.random.default_rng(0).normal(size=(6, 3, 4, 4)).astype(np.float32))
    loaded = graph.load(path)
    onnx.checker.check_model(loaded.proto, full_check=True)
    computed = "[1, 8, 16]" if static else "[N, 8, "
    assert [n for n in loaded.notes if f"'y' is declared {graph._dims(proto.graph.output[0].type.tensor_type.shape)}"
            f" but the graph computes {computed}" in n], loaded.notes
    code, out, err = run(capsys, "quantize", path, "-o", tmp_path / "q.onnx", "--calib", calib, "-w", "8", "-a", "8")
    assert code == 0, err
    assert "output 'y' is declared" in out
    written = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(written, full_check=True)
    assert len(written.graph.output[0].type.tensor_type.shape.dim) == 3


def test_a_correct_declared_output_shape_raises_no_note(tmp_path):
    from onnxmpq.graph import model as graph

    path = tmp_path / "m.onnx"
    onnx.save(wrong_output_shape_model(["N", "C", "T"]), path)
    assert graph.load(path).notes == ()


def test_an_omitted_optional_input_inside_a_branch_is_not_a_tensor(tmp_path, capsys):
    """MatMul -> If{then: Clip(h, '', hi); else: Identity(h)} -> MatMul (a VAD model with its sample-rate If
    inlined keeps such branches: an LSTM's omitted sequence_lens). GPTQ and the sensitivity probes run the
    graph in pieces and took '' for a tensor the If reads: 'tensor '' is neither computed nor at the cut'."""
    from conftest import arr, model, node, vi
    from onnx import helper

    from onnxmpq.graph.model import node_reads

    def branch(op, inputs, out):
        return helper.make_graph([helper.make_node(op, inputs, [out])], op, [], [vi(out, None)])

    proto = model([node("MatMul", ["x", "W1"], ["h"], "mm1"),
                   node("If", ["cond"], ["y"], "if0", then_branch=branch("Clip", ["h", "", "hi"], "t"),
                        else_branch=branch("Identity", ["h"], "e")),
                   node("MatMul", ["y", "W2"], ["out"], "mm2")],
                  [vi("x", ["N", 16])], [vi("out", ["N", 4])],
                  {"W1": arr(1, 16, 16, scale=0.3), "W2": arr(2, 16, 4, scale=0.3),
                   "hi": np.array(1.5, np.float32), "cond": np.array(True)}, 17)
    assert "" not in node_reads(proto.graph.node[1])
    path, calib = tmp_path / "if.onnx", tmp_path / "c.npz"
    onnx.save(proto, path)
    np.savez(calib, x=np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32))
    for extra in (["-w", "4", "-a", "8"], ["--budget", "avg-bits=6", "--bits", "4,8"]):
        code, out, err = run(capsys, "quantize", path, "-o", tmp_path / "q.onnx", "--calib", calib, *extra)
        assert code == 0, err
        onnx.checker.check_model(onnx.load(tmp_path / "q.onnx"), full_check=True)


def test_an_input_whose_batch_is_not_on_dim_0_is_refused_clearly(tmp_path, capsys):
    """A recurrent state [2, N, 8] beside x [N, 8]: fed batch-first it reached onnxruntime with the wrong
    axis and ended in a traceback from the latency timing."""
    from conftest import arr, model, node, vi

    proto = model([node("MatMul", ["x", "W"], ["h"], "mm"), node("ReduceSum", ["s", "axes"], ["r"], "sum", keepdims=0),
                   node("Add", ["h", "r"], ["y"], "add")],
                  [vi("x", ["N", 8]), vi("s", [2, "N", 8])], [vi("y", ["N", 8])],
                  {"W": arr(1, 8, 8), "axes": np.array([0], np.int64)}, 17)
    path, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(proto, path)
    np.savez(calib, x=np.zeros((2, 8), np.float32), s=np.zeros((2, 2, 8), np.float32))
    code, _, err = run(capsys, "quantize", path, "-o", tmp_path / "q.onnx", "--calib", calib)
    assert_refused(code, err, "model input 's' has shape (2, ?, 8)")
    assert "axis 1" in err and not (tmp_path / "q.onnx").exists()


def test_the_outputs_external_data_side_file_never_lands_on_an_input(tmp_path, capsys):
    """A model over 2 GB is written as OUT.onnx + OUT.onnx.data; that side file is checked against every
    input like the output itself: here the input model's own external data file, and the calibration."""
    from onnx.external_data_helper import convert_model_to_external_data

    proto = build_cnn()
    convert_model_to_external_data(proto, all_tensors_to_one_file=True, location="q.onnx.data", size_threshold=0)
    onnx.save(proto, tmp_path / "m.onnx")
    weights = (tmp_path / "q.onnx.data").read_bytes()
    code, _, err = run(capsys, "quantize", tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", "-w", "8", "-a", "float")
    assert_refused(code, err, "external data")
    assert (tmp_path / "q.onnx.data").read_bytes() == weights and not (tmp_path / "q.onnx").exists()
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    code, _, err = run(capsys, "quantize", tmp_path / "m.onnx", "-o", tmp_path / "c.npz.onnx", "--calib",
                       tmp_path / "c.npz", "--report", tmp_path / "c.npz.onnx.data")
    assert code == 1 and "same file" in err, err
