"""Shared pieces of the benchmarks: cached data sets, scoring, onnxruntime's quantize_static, timing."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from onnxmpq import calibrate
from onnxmpq.graph import model as graph
from onnxmpq.graph import runtime

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / "build" / "bench"
MODELS = {name: ROOT / "models" / f"{name}_cifar10.onnx" for name in ("resnet20", "resnet32", "resnet56")}
CALIB = ROOT / "calibration" / "cifar10_train256.npz"


@dataclass
class Context:
    """Data sets loaded once per benchmark run."""

    quick: bool = False
    _cache: dict = field(default_factory=dict)

    def cifar_test(self) -> tuple[np.ndarray, np.ndarray]:
        """The CIFAR-10 test images (10,000, or 2,000 in a quick run) preprocessed as the models expect."""
        if "cifar" not in self._cache:
            path = CACHE / "cifar10_test.npz"
            if not path.exists():
                CACHE.mkdir(parents=True, exist_ok=True)
                model = graph.load(MODELS["resnet20"])
                source = calibrate.read(DATA / "cifar10" / "test", model)
                xs, ys = zip(*[(b.inputs["input"], b.labels) for b in source.batches(500)])
                np.savez(path, input=np.concatenate(xs), labels=np.concatenate(ys))
            data = np.load(path)
            x, y = data["input"], data["labels"]
            if self.quick:
                x, y = x[::5], y[::5]
            self._cache["cifar"] = (x, y)
        return self._cache["cifar"]

    def ocr_sets(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(eval images, eval texts, calibration images) of rendered PP-OCRv4 lines."""
        if "ocr" not in self._cache:
            from benchmarks import ocr
            eval_path, calib_path = CACHE / "ocr_eval.npz", CACHE / "ocr_calib.npz"
            if not eval_path.exists():
                CACHE.mkdir(parents=True, exist_ok=True)
                ocr.write_sets(CACHE)
            ev = np.load(eval_path)
            x, texts = ev["x"], [str(t) for t in ev["texts"]]
            if self.quick:
                x, texts = x[:100], texts[:100]
            self._cache["ocr"] = (x, texts, np.load(calib_path)["x"])
        return self._cache["ocr"]


def logits(model, x: np.ndarray, batch: int = 500) -> np.ndarray:
    sess = runtime.session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def classify(model, x: np.ndarray, labels: np.ndarray, ref: np.ndarray | None = None) -> dict:
    """top1 against labels and agreement with reference logits."""
    y = logits(model, x)
    out = {"top1": float((y.argmax(1) == labels).mean())}
    if ref is not None:
        out["agreement"] = float((y.argmax(1) == ref.argmax(1)).mean())
    return out


class ArrayReader(CalibrationDataReader):
    """onnxruntime's calibration reader over an array, batch by batch."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 32):
        self.name, self.x, self.batch, self.i = name, x, batch, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        chunk = self.x[self.i:self.i + self.batch]
        self.i += self.batch
        return {self.name: chunk}

    def rewind(self):
        self.i = 0


def ort_quantize_static(model: Path, out: Path, name: str, calib: np.ndarray, method: str = "MinMax",
                        activation_type=None, per_channel: bool = True) -> float:
    """onnxruntime's own QDQ quantize_static (per-channel weights); returns its wall time in seconds."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
    start = time.perf_counter()
    quantize_static(str(pre), str(out), ArrayReader(name, calib), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=activation_type or QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method),
                    extra_options={"ActivationSymmetric": False})
    elapsed = time.perf_counter() - start
    pre.unlink(missing_ok=True)
    return elapsed


def median_time(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,d}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
