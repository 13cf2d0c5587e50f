"""Issue 4: sensitivity sweep cost (engine vs naive, cached re-run) and how well each metric predicts
the true damage of quantizing one layer (Spearman rank correlation)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import onnxmpq
from benchmarks import common
from onnxmpq.types import Candidate

METRICS = ("sqnr", "kl", "output-entropy", "mutual-info", "weight-entropy")
_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import onnxmpq
start = time.perf_counter()
onnxmpq.pipeline.api.sensitivity({model!r}, {calib!r}, metrics=["sqnr"], weight_bits=(2, 4, 8), limit={limit},
                        naive={naive}, cache_dir={cache!r}, rounding="nearest")
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"time_s": time.perf_counter() - start, "peak_mb": hwm / 1024}}))
"""


def sweep_cost(model, calib, limit: int, naive: bool, cache=None) -> dict:
    code = _CHILD.format(root=str(common.ROOT), model=str(model), calib=str(calib), limit=limit, naive=naive,
                         cache=str(cache) if cache else None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cost_rows(ctx: common.Context, tmp: Path) -> list[list]:
    rows = []
    _, _, ocr_calib = ctx.ocr_sets()
    ocr_path = tmp / "ocr_calib.npz"
    np.savez(ocr_path, x=ocr_calib[:64])
    from benchmarks import ocr
    cases = [("resnet20", common.MODELS["resnet20"], common.CALIB, 256),
             ("resnet56", common.MODELS["resnet56"], common.CALIB, 256),
             ("PP-OCRv4 (64 lines)", ocr.model_path(), ocr_path, 64)]
    for name, model, calib, limit in cases:
        engine = sweep_cost(model, calib, limit, naive=False, cache=tmp / f"cache_{name}")
        naive = sweep_cost(model, calib, limit, naive=True)
        cached = sweep_cost(model, calib, limit, naive=False, cache=tmp / f"cache_{name}")
        rows.append([name, limit, f"{engine['time_s']:.1f}", f"{naive['time_s']:.1f}",
                     f"{engine['time_s'] / naive['time_s']:.2f}", f"{cached['time_s']:.2f}",
                     f"{engine['peak_mb']:.0f}", f"{naive['peak_mb']:.0f}"])
    return rows


def true_damage(model, layers, bits: int, score, tmp: Path) -> np.ndarray:
    """Damage with only one layer at `bits` (weights; activations float), for every layer."""
    out = []
    for spec in layers:
        path = tmp / "one.onnx"
        onnxmpq.quantize(model, path, None, weight_bits=None, act_bits=None, layer_bits={spec.name: Candidate(bits, None)},
                         rounding="nearest")
        out.append(score(path))
    return np.array(out)


def correlation_rows(name: str, model, calib, score, tmp: Path, limit: int) -> list[list]:
    m = onnxmpq.load(model)
    tables = {t.metric: t for t in onnxmpq.pipeline.api.sensitivity(m, calib, metrics=METRICS, weight_bits=(2, 4), limit=limit,
                                                           rounding="nearest")}
    rows = []
    for bits in (2, 4):
        damage = true_damage(m, m.layers, bits, score, tmp)
        row = [name, f"W{bits}", f"{damage.max():.4f}"]
        for metric in METRICS:
            predicted = [layer.scores[f"w{bits}"] for layer in tables[metric].layers]
            rho = spearmanr(predicted, damage).statistic
            row.append(f"{rho:.2f}")
        rows.append(row)
    return rows


def run(ctx: common.Context) -> str:
    parts = ["## Sensitivity (issue 4)\n"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parts += ["### Sweep cost: every layer x weights {2, 4, 8} bits, metric sqnr, each run in its own process\n",
                  common.table(["model", "samples", "engine s", "naive s", "engine / naive", "cached re-run s",
                                "engine peak MB", "naive peak MB"], cost_rows(ctx, tmp)), ""]
        x, labels = ctx.cifar_test()
        base = common.classify(common.MODELS["resnet20"], x, labels)["top1"]
        rows = correlation_rows("resnet20", common.MODELS["resnet20"], common.CALIB,
                                lambda p: base - common.classify(p, x, labels)["top1"], tmp, 256)
        from benchmarks import ocr
        ox, texts, calib = ctx.ocr_sets()
        ox, texts = ox[:100], texts[:100]
        ocr_calib = tmp / "ocr_calib.npz"
        np.savez(ocr_calib, x=calib[:64])
        float_cer = ocr.score(ocr.model_path(), ox, texts)["cer"]
        rows += correlation_rows("PP-OCRv4", ocr.model_path(), ocr_calib,
                                 lambda p: ocr.score(p, ox, texts)["cer"] - float_cer, tmp, 64)
        parts += [f"### Rank correlation with true damage (Spearman over layers; true damage = top-1 drop on "
                  f"{len(x):,d} CIFAR-10 test images, or CER rise on 100 rendered lines, with only that layer's "
                  "weights quantized; scores from the calibration set, no labels)\n",
                  common.table(["model", "bits", "max damage"] + list(METRICS), rows), ""]
    return "\n".join(parts)
