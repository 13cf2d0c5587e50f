"""Peak memory against calibration-set size (issue 7) and of the search against set and model size (issue 13).

Issue 7: the 256 bundled CIFAR-10 calibration images are tiled to 256 ... 8,192 samples and saved as
.npz; `onnxmpq quantize` runs in a fresh process for each size and reports its peak resident memory
(VmHWM): W8A8 with nearest rounding (activation statistics streamed batch by batch), and W4A8 with
GPTQ rounding capped by `--limit 512`.

Issue 13: the two steps of a mixed-precision run that carry the calibration set through the graph,
each alone in a fresh process: the sensitivity sweep (`onnxmpq sensitivity`, W2/W4/W8, fast and exact
probes) and GPTQ rounding (`onnxmpq quantize -w 4 -a 8 --rounding gptq`), on ResNet-20 with 256 to
2,048 samples, ResNet-56 with 256 and the 224x224 depthwise CNN of `benchmarks/cnn.py` with 64. The
cut between two segments is held in RAM up to `engine.SPILL_BUDGET` (512 MiB) and spilled to disk
beyond; the last two columns rerun the all-sample fast sweep and GPTQ with a 16 MiB budget, where the
cuts of these sets spill, to show the peak that is left when the set no longer fits the budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import cnn, common

SIZES = (256, 1024, 4096, 8192)
SEARCH_SIZES = (256, 1024, 2048)
SMALL_BUDGET = 16 << 20
_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import onnxmpq
start = time.perf_counter()
onnxmpq.quantize({model!r}, {out!r}, {calib!r}, weight_bits={wb}, act_bits=8, rounding={rounding!r},
                 limit={limit!r}, verify=False)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"time_s": time.perf_counter() - start, "peak_mb": hwm / 1024}}))
"""


def _tiled(base: np.ndarray, size: int, tmp: Path) -> Path:
    """The bundled calibration images tiled to `size` samples, saved as an .npz in `tmp`."""
    calib = tmp / f"calib_{size}.npz"
    np.savez(calib, input=np.resize(base, (size,) + base.shape[1:]))
    return calib


def _child(model, out, calib, wb, rounding, limit) -> dict:
    code = _CHILD.format(root=str(common.ROOT), model=str(model), out=str(out), calib=str(calib), wb=wb,
                         rounding=rounding, limit=limit)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


_CLI = """
import json, sys, time
sys.path.insert(0, {root!r})
from onnxmpq.graph import engine
from onnxmpq.cli.main import main
if {budget!r} is not None:
    engine.SPILL_BUDGET = {budget!r}
start = time.perf_counter()
code = main({args!r})
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"code": code, "time_s": time.perf_counter() - start, "peak_mb": hwm / 1024}}))
"""


def _cli(args: list, budget: int | None = None) -> str:
    """`peak MB / s` of one `onnxmpq` command in a fresh process (cut budget `budget` bytes if given)."""
    code = _CLI.format(root=str(common.ROOT), args=[str(a) for a in args], budget=budget)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or json.loads(lines[-1])["code"] != 0:
        raise RuntimeError(f"onnxmpq {args[:2]} failed: {done.stderr[-2000:]}")
    got = json.loads(lines[-1])
    return f"{got['peak_mb']:.0f} / {got['time_s']:.1f}"


def _search_row(label: str, model: Path, calib: Path, n: int, tmp: Path) -> list:
    sweep = ["-q", "sensitivity", model, "--calib", calib, "--limit", n, "--bits", "2,4,8", "-o", tmp / "t.json"]
    gptq = ["-q", "quantize", model, "-o", tmp / "m.onnx", "--calib", calib, "--limit", n, "-w", "4", "-a", "8",
            "--rounding", "gptq", "--no-verify"]
    every = [*sweep, "--probes", "fast", "--rounding", "gptq"]  # GPTQ-rounded probes read every sample
    row = [label, f"{n:,}", _cli([*sweep, "--probes", "fast"]), _cli(every), _cli([*sweep, "--probes", "exact"]),
           _cli(gptq), _cli(every, SMALL_BUDGET), _cli(gptq, SMALL_BUDGET)]
    print(row, flush=True)
    return row


def search(ctx: common.Context) -> str:
    """The issue-13 table: sweep and GPTQ peak memory against set size and model size."""
    base = np.load(common.CALIB)["input"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in SEARCH_SIZES:
            calib = _tiled(base, size, tmp)
            rows.append(_search_row("resnet20 (32x32)", common.MODELS["resnet20"], calib, size, tmp))
        rows.append(_search_row("resnet56 (32x32)", common.MODELS["resnet56"], common.CALIB, 256, tmp))
        model, _ = cnn.ensure(tmp / "effnet")
        calib = tmp / "effnet" / "calib64.npz"
        np.savez(calib, **{cnn.INPUT: cnn.calibration(64)})
        rows.append(_search_row("effnet_lite0 (224x224)", model, calib, 64, tmp))
    return "\n".join([
        "## Memory of the search against set size and model size (issue 13)\n",
        "Each cell: peak resident memory (VmHWM) MB / wall seconds of one command in a fresh process. "
        "Sweep: `onnxmpq sensitivity MODEL --limit N --bits 2,4,8` (sqnr, batch 64) with the column's probes: "
        "fast with nearest rounding (the default, as in quantize: the first 128 samples), fast with GPTQ-rounded "
        "probes (every sample flows through the engine), exact with nearest rounding (every sample); GPTQ: "
        "`onnxmpq quantize -w 4 -a 8 --rounding gptq --limit N --no-verify` (its two frontiers, float and "
        "quantized, at batch 64); the last two columns again with the cut between segments capped at 16 MiB of "
        "RAM per frontier (`engine.SPILL_BUDGET`, 512 MiB by default; the rest on disk). "
        "Before issue 13 the exact sweep of the 224x224 CNN peaked at 3.8 GB (onnxruntime's arena, one per "
        "session) and a mixed-precision run on it at 7.2 GB.\n",
        common.table(["model", "samples", "sweep fast MB / s", "sweep fast, GPTQ probes MB / s",
                      "sweep exact MB / s", "gptq W4 MB / s", "sweep fast, GPTQ probes, 16 MiB cut MB / s",
                      "gptq W4, 16 MiB cut MB / s"], rows), ""])


def run(ctx: common.Context) -> str:
    base = np.load(common.CALIB)["input"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in SIZES:
            calib = _tiled(base, size, tmp)
            mb = calib.stat().st_size / 1e6
            near = _child(common.MODELS["resnet20"], tmp / "m.onnx", calib, 8, "nearest", None)
            gptq = _child(common.MODELS["resnet20"], tmp / "m.onnx", calib, 4, "gptq", 512)
            rows.append([size, f"{mb:.0f}", f"{near['peak_mb']:.0f}", f"{near['time_s']:.1f}",
                         f"{gptq['peak_mb']:.0f}", f"{gptq['time_s']:.1f}"])
    return "\n".join(["## Memory against calibration size (issue 7)\n",
                      "ResNet-20, `onnxmpq.quantize` in a fresh process per row; peak resident memory (VmHWM). "
                      "The .npz is read member by member and batch by batch, never whole.\n",
                      common.table(["samples", "file MB", "W8A8 nearest peak MB", "s", "W4A8 gptq (--limit 512) peak MB",
                                    "s"], rows), ""])
