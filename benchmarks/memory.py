"""Issue 7: peak memory against calibration-set size.

The 256 bundled CIFAR-10 calibration images are tiled to 256 ... 8,192 samples and saved as .npz;
`onnxmpq quantize` runs in a fresh process for each size and reports its peak resident memory
(VmHWM): W8A8 with nearest rounding (activation statistics streamed batch by batch), and W4A8 with
GPTQ rounding capped by `--limit 512` (GPTQ carries the calibration set through the graph segment by
segment, so without a cap its memory grows with the set).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import common

SIZES = (256, 1024, 4096, 8192)
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


def _child(model, out, calib, wb, rounding, limit) -> dict:
    code = _CHILD.format(root=str(common.ROOT), model=str(model), out=str(out), calib=str(calib), wb=wb,
                         rounding=rounding, limit=limit)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(ctx: common.Context) -> str:
    base = np.load(common.CALIB)["input"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in SIZES:
            calib = tmp / f"calib_{size}.npz"
            np.savez(calib, input=np.resize(base, (size,) + base.shape[1:]))
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
