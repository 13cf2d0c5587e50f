"""Issue 3: nearest vs GPTQ rounding at uniform W4/W3/W2 (activations float and A8) on ResNet-20,
ResNet-56 and PP-OCRv4, with rounding time and peak memory (each quantization in its own process)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import common

WIDTHS = (8, 4, 3, 2)
_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import onnxmpq
start = time.perf_counter()
r = onnxmpq.quantize({model!r}, {out!r}, {calib!r}, weight_bits={wb}, act_bits={ab}, rounding={rounding!r})
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"time_s": time.perf_counter() - start, "peak_mb": hwm / 1024, "notes": list(r.notes)}}))
"""


def quantize_in_child(model, out, calib, wb, ab, rounding) -> dict:
    """Runs one quantization in a fresh interpreter: its wall time and peak RSS are its own."""
    code = _CHILD.format(root=str(common.ROOT), model=str(model), out=str(out), calib=str(calib),
                         wb=wb, ab=ab, rounding=rounding)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cost(ctx: common.Context) -> str:
    """GPTQ W4A8 time and peak memory (VmHWM of a fresh process) per model."""
    from benchmarks import ocr
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, _, calib = ctx.ocr_sets()
        np.savez(tmp / "ocr_calib.npz", x=calib[:64])
        for name, model, data in (("resnet20", common.MODELS["resnet20"], common.CALIB),
                                  ("resnet56", common.MODELS["resnet56"], common.CALIB),
                                  ("PP-OCRv4 (64 lines)", ocr.model_path(), tmp / "ocr_calib.npz")):
            info = quantize_in_child(model, tmp / "m.onnx", data, 4, 8, "gptq")
            rows.append([name, f"{info['time_s']:.1f}", f"{info['peak_mb']:.0f}"])
    return "\n".join(["## Rounding cost (issue 3)\n",
                      "`onnxmpq.quantize(..., weight_bits=4, act_bits=8, rounding=\"gptq\")` in a fresh process: "
                      "wall time of the whole call (calibration, GPTQ, writing) and peak resident memory (VmHWM).\n",
                      common.table(["model", "seconds", "peak MB"], rows), ""])


def _rows(model, calib, tmp: Path, score) -> tuple[list[list], list[list]]:
    rows, costs = [], []
    for ab in (None, 8):
        for wb in WIDTHS:
            row = [f"W{wb}A{ab or 'float'}"]
            for rounding in ("nearest", "gptq"):
                out = tmp / f"m_{wb}_{ab}_{rounding}.onnx"
                info = quantize_in_child(model, out, calib, wb, ab, rounding)
                row += score(out)
                if rounding == "gptq":
                    costs.append([row[0], f"{info['time_s']:.1f}", f"{info['peak_mb']:.0f}"])
            rows.append(row)
    return rows, costs


def run(ctx: common.Context) -> str:
    parts = ["## Rounding: nearest vs GPTQ with float-target re-fit (issue 3)\n",
             "Uniform widths, every Conv/Gemm/MatMul layer; calibration as in the uniform section. "
             "Time and peak memory are those of the whole `onnxmpq.quantize` call with `--rounding gptq` "
             "(calibration, rounding, writing), each in its own process.\n"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        x, labels = ctx.cifar_test()
        for name in ("resnet20", "resnet56"):
            model = common.MODELS[name]
            ref = common.logits(model, x)
            float_top1 = common.classify(model, x, labels)["top1"]
            rows, costs = _rows(model, common.CALIB, tmp, lambda p, ref=ref: [common.classify(p, x, labels, ref)["top1"]])
            for row in rows:
                row.append(f"{100 * (row[2] - float_top1):+.2f}")
            parts += [f"### {name}: top-1 ({len(x):,d} test images; float {float_top1:.4f})\n",
                      common.table(["weights/acts", "nearest", "gptq", "gptq - float (points)"], rows), "",
                      common.table(["gptq run", "seconds", "peak MB"], costs), ""]
        from benchmarks import ocr
        ox, texts, calib = ctx.ocr_sets()
        calib_path = tmp / "ocr_calib.npz"
        np.savez(calib_path, x=calib[:64])
        float_cer = ocr.score(ocr.model_path(), ox, texts)["cer"]

        def score(path):
            return [ocr.score(path, ox, texts)["cer"]]

        rows, costs = _rows(ocr.model_path(), calib_path, tmp, score)
        parts += [f"### PP-OCRv4: CER ({len(ox)} rendered lines, 64 calibration lines; float CER {float_cer:.4f})\n",
                  common.table(["weights/acts", "nearest", "gptq"], rows), "",
                  common.table(["gptq run", "seconds", "peak MB"], costs), ""]
    return "\n".join(parts)


COLUMNS_PER_K = (None, 256, 64)


def columns(ctx: common.Context) -> str:
    """GPTQ's statistics over every im2col column against about columns_per_k * K of them (every s-th,
    `rounding.gptq.column_stride`): the GPTQ stage's seconds (from the report, in one process, the
    settings interleaved per model and width) and top-1 on the CIFAR-10 test images."""
    from onnxmpq.pipeline import api, stages
    from onnxmpq.rounding import sequential
    from onnxmpq.rounding.gptq import GptqSettings

    x, labels = ctx.cifar_test()
    rows, original = [], sequential.round_model
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.onnx"
        try:
            for name in ("resnet20", "resnet56"):
                for bits in (3, 4):
                    for cpk in COLUMNS_PER_K:
                        stages.sequential.round_model = functools.partial(
                            original, settings=GptqSettings(columns_per_k=cpk))
                        report = api.quantize(common.MODELS[name], out, str(common.CALIB), weight_bits=bits,
                                              act_bits=8, rounding="gptq", verify=False)
                        rows.append([name, f"W{bits}A8", "all" if cpk is None else cpk,
                                     f"{report.stages['gptq']:.1f}", common.classify(out, x, labels)["top1"]])
                        print(rows[-1], flush=True)
        finally:
            stages.sequential.round_model = original
    return "\n".join([
        "## GPTQ statistics over a share of the columns (issue 13)\n",
        f"Uniform GPTQ rounding, 256 calibration images, H and C over every im2col column ('all') or every s-th "
        f"column so that about columns_per_k x K remain (the default is {GptqSettings().columns_per_k}); the GPTQ "
        f"stage's seconds from the report, top-1 on {len(x):,d} CIFAR-10 test images (standard error about "
        "0.4 points).\n",
        common.table(["model", "widths", "columns per K", "gptq s", "top-1"], rows), ""])
