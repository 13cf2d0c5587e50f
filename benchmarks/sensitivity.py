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


# --- issue 13: fast probes ---------------------------------------------------------------------------

FAST_METRICS = ("sqnr", "kl")
FAST_BITS = (2, 3, 4, 5, 6, 7, 8)
REPEATS = 2  # each sweep timed this many times, exact and fast in turn; the fastest run counts
_TIMED = """
import json, sys, time
sys.path.insert(0, {root!r})
import onnxmpq
from onnxmpq.graph import engine
runs = [0]
peek = engine.Frontier.peek
outputs = {{o.name for o in onnxmpq.load({model!r}).proto.graph.output}}
def counted(self, proto, targets, extra=()):
    runs[0] += bool(outputs & set(targets))
    return peek(self, proto, targets, extra)
engine.Frontier.peek = counted
start = time.perf_counter()
tables = onnxmpq.pipeline.api.sensitivity({model!r}, {calib!r}, metrics={metrics!r}, weight_bits={bits!r},
                                          limit={limit}, rounding="nearest", probes={probes!r})
elapsed = time.perf_counter() - start
print(json.dumps({{"time_s": elapsed, "runs": runs[0], "tables": [t.to_dict() for t in tables]}}))
"""


def timed_sweep(model, calib, limit: int, probes: str) -> dict:
    """One sweep (every layer at FAST_BITS, weights only, FAST_METRICS) in its own process: its time, the
    engine runs that reached the graph outputs (the float reference and the probes) and its tables."""
    code = _TIMED.format(root=str(common.ROOT), model=str(model), calib=str(calib), metrics=list(FAST_METRICS),
                         bits=list(FAST_BITS), limit=limit, probes=probes)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bundled_cifar(ctx: common.Context) -> tuple[np.ndarray, np.ndarray]:
    """The 2,000 bundled CIFAR-10 test images (data/cifar10-test) preprocessed as the ResNets expect."""
    if "bundled" not in ctx._cache:
        from onnxmpq import calibrate
        from onnxmpq.graph import model as graph
        source = calibrate.read(common.ROOT / "data" / "cifar10-test", graph.load(common.MODELS["resnet20"]))
        xs, ys = zip(*[(b.inputs["input"], b.labels) for b in source.batches(500)])
        ctx._cache["bundled"] = (np.concatenate(xs), np.concatenate(ys))
    return ctx._cache["bundled"]


def _scores(table: dict) -> np.ndarray:
    return np.array([[layer["scores"][f"w{b}"] for b in FAST_BITS] for layer in table["layers"]])


def fast_rows(name: str, model, calib, limit: int, damage: np.ndarray | None) -> list[list]:
    """One row per metric: sweep times and engine runs, exact then fast; Spearman of fast against exact
    over every (layer, width) score and over the layers at each width, and of a layer-blind baseline
    (score 4^-b at b bits, the same for every layer) over every score; of each table against `damage`."""
    runs = [timed_sweep(model, calib, limit, probes) for _ in range(REPEATS) for probes in ("exact", "fast")]
    exact, quick = runs[0], runs[1]  # the tables are the same in every repeat; the times are not (shared cores)
    exact["time_s"] = min(r["time_s"] for r in runs[0::2])
    quick["time_s"] = min(r["time_s"] for r in runs[1::2])
    rows = []
    for k, metric in enumerate(FAST_METRICS):
        e, f = _scores(exact["tables"][k]), _scores(quick["tables"][k])
        per_width = [spearmanr(e[:, j], f[:, j]).statistic for j in range(len(FAST_BITS))]
        blind = np.tile(4.0 ** -np.array(FAST_BITS), (len(e), 1))
        vs_true = [f"{spearmanr(s[:, 0], damage).statistic:.2f}" if damage is not None else "-" for s in (e, f)]
        rows.append([name, len(e), metric, f"{exact['time_s']:.1f}", f"{quick['time_s']:.1f}",
                     f"{exact['time_s'] / quick['time_s']:.1f}x", f"{exact['runs']:,d} / {quick['runs']:,d}",
                     f"{spearmanr(e.ravel(), f.ravel()).statistic:.3f}", f"{spearmanr(e.ravel(), blind.ravel()).statistic:.3f}",
                     f"{np.mean(per_width):.2f} ({min(per_width):.2f} at W{FAST_BITS[int(np.argmin(per_width))]})",
                     *vs_true])
    return rows


def fast(ctx: common.Context) -> str:
    """Issue 13: fast probes against exact ones on the bundled ResNets and the EfficientNet-Lite0-style CNN."""
    from benchmarks import cnn
    x, labels = bundled_cifar(ctx)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("resnet20", "resnet56"):
            model = common.MODELS[name]
            base = common.classify(model, x, labels)["top1"]
            m = onnxmpq.load(model)
            damage = true_damage(m, m.layers, 2, lambda p, base=base: base - common.classify(p, x, labels)["top1"],
                                 Path(tmp))
            rows += fast_rows(name, model, common.CALIB, 256, damage)
    effnet, effnet_calib = cnn.ensure(common.CACHE)
    rows += fast_rows("EfficientNet-Lite0-style", effnet, effnet_calib, 32, None)
    return "\n".join([
        "### Fast probes (issue 13): one network run per layer instead of one per layer and width\n",
        f"Every weighted layer at weights {{{', '.join(map(str, FAST_BITS))}}} bits (activations float), nearest "
        "rounding, 256 calibration images for the exact probes and the first 128 of them for the fast ones "
        "(`fast.SAMPLES`; 32 random inputs for the EfficientNet-Lite0-style CNN, whose random "
        "weights classify nothing: no true damage); each sweep in its own process, exact and fast in turn, "
        f"{REPEATS} times, the fastest of each counted (the cores are shared with other jobs). Engine runs: "
        "network runs that reach the outputs, the float reference included. Spearman rank correlation of the "
        "fast table against the exact one over every (layer, width) score, and over the layers at each width "
        "(mean, and the worst width); the same over every score for a layer-blind baseline that scores 4^-b at b "
        "bits whatever the layer (what the widths' order alone gives); against the true damage of one layer "
        "at W2: top-1 drop on the "
        f"{len(x):,d} bundled CIFAR-10 test images (data/cifar10-test) with only that layer's weights at 2 bits.\n",
        common.table(["model", "layers", "metric", "exact s", "fast s", "speed-up", "engine runs exact / fast",
                      "rho fast~exact, all scores", "rho 4^-b~exact, all scores", "rho fast~exact per width: mean (worst)",
                      "rho exact~true W2", "rho fast~true W2"], rows), ""])


PROBE_SETTINGS = (("gptq", "exact"), ("gptq", "fast"), ("nearest", "exact"), ("nearest", "fast"))
PROBE_BUDGETS = {"resnet20": (2.5, 3.0, 3.5), "resnet56": (2.5, 3.0, 3.5)}


def probe_rounding(ctx: common.Context) -> str:
    """Issue 13: the allocations chosen from probes rounded by GPTQ or to nearest (exact or fast), each
    written with GPTQ: top-1 of the written model on the CIFAR-10 test images, and the sweep's seconds
    (from the report; a sensitivity cache per model shares one table between the budgets)."""
    x, labels = ctx.cifar_test()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.onnx"
        for name, budgets in PROBE_BUDGETS.items():
            for rounding, probes in PROBE_SETTINGS:
                for budget in budgets:
                    report = onnxmpq.quantize(common.MODELS[name], out, str(common.CALIB), act_bits=8, verify=False,
                                              budgets=[f"avg-bits={budget}"],
                                              search={"probes": probes, "probe_rounding": rounding,
                                                      "cache_dir": str(Path(tmp) / f"cache-{name}")})
                    sweep = report.stages.get("sensitivity")
                    rows.append([name, budget, rounding, probes, "cached" if sweep is None else f"{sweep:.1f}",
                                 f"{report.avg_weight_bits:.3f}", common.classify(out, x, labels)["top1"]])
                    print(rows[-1], flush=True)
    return "\n".join([
        "## Probe rounding (issue 13): nearest or GPTQ inside the sensitivity probes, GPTQ for the written model\n",
        f"`onnxmpq.quantize(MODEL, ..., act_bits=8, budgets=['avg-bits=B'], search={{probes, probe_rounding}})`, "
        f"metric kl, method ilp, widths 2-8, the written model rounded by GPTQ (`--rounding auto`); top-1 on "
        f"{len(x):,d} CIFAR-10 test images (standard error about 0.4 points). Sweep seconds: the sensitivity "
        "stage of the report, 'cached' where an earlier budget's table served.\n",
        common.table(["model", "avg-bits", "probe rounding", "probes", "sweep s", "avg W", "top-1"], rows), ""])
