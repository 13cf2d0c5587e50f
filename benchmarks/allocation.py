"""Issue 5: mixed precision chosen under budgets against uniform precision.

For ResNet-20 and ResNet-56 (CIFAR-10 test) and PP-OCRv4 recognition (rendered lines): metric x
allocator at 3, 4 and 5 average weight bits (activations 8), uniform widths beside them, accuracy,
size, BitOps and search time; GPTQ rows at 2.5 and 3 bits; the OCR mixed A8/A16 target; a Pareto
frontier plot; the solvers' time on 500 layers x 6 candidates with two budgets (`ilp` with its fast
path, SCIP and CP-SAT alone, greedy; `python -m benchmarks.allocation --solvers` measures that table
alone). Sensitivity tables are measured once per (model, metric) through `--cache` and reused by every
allocator.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common

RESULTS = common.ROOT / "benchmarks" / "results"
CACHE = common.CACHE / "alloc_cache"  # sensitivity tables kept across runs of this benchmark
BITS = (3, 4, 5)


def _quantize(model, out, calib, cache, **kw) -> tuple[object, float]:
    import onnxmpq

    start = time.perf_counter()
    report = onnxmpq.quantize(model, out, calib, verify=False, **kw)
    return report, time.perf_counter() - start


def _settings(metric, method, cache, **extra):
    from onnxmpq.allocate import SOLVERS
    from onnxmpq.pipeline.config import SearchConfig

    own = SOLVERS.get(method).metric  # a method with its own metric takes no other
    return SearchConfig(metric=None if own else metric, method=method, cache_dir=str(cache), **extra)


def _partial(parts: list[str]) -> None:
    """Writes what is measured so far (a long run that is stopped keeps its finished sections)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "allocation.partial.md").write_text("\n".join(parts) + "\n")


def cifar_rows(ctx, name: str, metrics, methods, tmp: Path, gptq_bits=(2.5, 3), bits_list=BITS,
               gptq_uniform=(2, 3)) -> tuple[list, float]:
    from onnxmpq.allocate import parse_budget

    x, labels = ctx.cifar_test()
    model, calib, cache = common.MODELS[name], common.CALIB, CACHE / f"cache_{name}"
    score = lambda p: common.classify(p, x, labels)["top1"]  # noqa: E731
    base = score(model)
    rows = [[name, "float", "-", "-", 32.0, round(base, 4), "-", "-", "-"]]
    for wb in (3, 4, 5):
        report, secs = _quantize(model, tmp / "u.onnx", calib, cache, weight_bits=wb, act_bits=8, rounding="nearest")
        rows.append([name, f"uniform W{wb}A8", "-", "nearest", wb, round(score(tmp / "u.onnx"), 4),
                     report.weight_bytes, f"{report.bitops:.3g}", f"{secs:.1f}"])
    runs = [(metric, method) for method in methods if method in ("ilp", "greedy") for metric in metrics]
    runs += [("-", method) for method in methods if method in ("threshold", "eagl")]  # their own metric
    for bits in bits_list:
        for metric, method in runs:
            settings = _settings(metric, method, cache, **({"trials": 30} if method == "threshold" else {}))
            report, secs = _quantize(model, tmp / "m.onnx", calib, cache, budgets=[parse_budget(f"avg-bits={bits}")],
                                     search=settings, rounding="nearest")
            rows.append([name, f"{method} avg {bits}", report.allocation["metric"], "nearest",
                         round(report.avg_weight_bits, 3), round(score(tmp / "m.onnx"), 4), report.weight_bytes,
                         f"{report.bitops:.3g}", f"{secs:.1f}"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    for row in rows[:4]:
        print(" | ".join(map(str, row)), flush=True)
        if "eagl" in methods and bits == 3:
            settings = _settings("weight-entropy", "eagl", cache, weight_bits=(2, 4))
            report, secs = _quantize(model, tmp / "m.onnx", calib, cache, budgets=[parse_budget("avg-bits=3")],
                                     search=settings, rounding="nearest")
            rows.append([name, "eagl {2,4} avg 3", "weight-entropy", "nearest", round(report.avg_weight_bits, 3),
                         round(score(tmp / "m.onnx"), 4), report.weight_bytes, f"{report.bitops:.3g}", f"{secs:.1f}"])
    for wb in gptq_uniform:
        report, secs = _quantize(model, tmp / "u.onnx", calib, cache, weight_bits=wb, act_bits=8, rounding="gptq")
        rows.append([name, f"uniform W{wb}A8", "-", "gptq", wb, round(score(tmp / "u.onnx"), 4), report.weight_bytes,
                     f"{report.bitops:.3g}", f"{secs:.1f}"])
    for bits in gptq_bits:
        settings = _settings("kl", "ilp", cache)
        report, secs = _quantize(model, tmp / "m.onnx", calib, cache, budgets=[parse_budget(f"avg-bits={bits}")],
                                 search=settings, rounding="gptq")
        rows.append([name, f"ilp avg {bits}", "kl (gptq probes)", "gptq", round(report.avg_weight_bits, 3),
                     round(score(tmp / "m.onnx"), 4), report.weight_bytes, f"{report.bitops:.3g}", f"{secs:.1f}"])
    return rows, base


def ocr_rows(ctx, tmp: Path) -> tuple[list, float]:
    from benchmarks import ocr
    from onnxmpq.allocate import parse_budget

    ox, texts, calib_x = ctx.ocr_sets()
    calib = tmp / "ocr_calib.npz"
    np.savez(calib, x=calib_x[:16])
    model, cache = ocr.model_path(), CACHE / "cache_ocr"
    base = ocr.score(model, ox, texts)
    rows = [["float", "-", "-", "-", round(100 * base["cer"], 2), round(100 * base["exact"], 1), "-", "-", "-"]]
    for wb, ab in ((8, 8), (8, 16), (5, 8), (4, 8)):
        report, secs = _quantize(model, tmp / "u.onnx", calib, cache, weight_bits=wb, act_bits=ab, rounding="auto")
        s = ocr.score(tmp / "u.onnx", ox, texts)
        rows.append([f"uniform W{wb}A{ab}", "-", "auto", wb, round(100 * s["cer"], 2), round(100 * s["exact"], 1),
                     report.weight_bytes, f"{report.bitops:.3g}", f"{secs:.1f}"])
    for metric in ("sqnr",):
        settings = _settings(metric, "ilp", cache, weight_bits=(4, 5, 6, 8))
        report, secs = _quantize(model, tmp / "m.onnx", calib, cache, rounding="auto", search=settings,
                                 act_bits=(8, 16), limit=16,
                                 budgets=[parse_budget("avg-bits=5"), parse_budget("bitops=1.5x")])
        s = ocr.score(tmp / "m.onnx", ox, texts)
        a16 = sum(1 for l in report.layers if l.act_bits == 16)
        print("ocr", metric, flush=True)
        rows.append([f"ilp avg 5, bitops 1.5x W8A8 ({a16} layers A16)", metric, "auto",
                     round(report.avg_weight_bits, 3), round(100 * s["cer"], 2), round(100 * s["exact"], 1),
                     report.weight_bytes, f"{report.bitops:.3g}", f"{secs:.1f}"])
    return rows, base["cer"]


def timing_problem():
    """500 layers x 6 candidates (W2..W8 at A8), sensitivity falling with the bits, avg-bits and BitOps budgets."""
    from onnxmpq.allocate import Problem

    rng = np.random.default_rng(0)
    n, bits = 500, np.array([2, 3, 4, 5, 6, 8])
    params, macs = rng.integers(100, 100_000, n), rng.integers(1000, 10 ** 7, n)
    scores = np.exp(-0.7 * bits)[None, :] * rng.uniform(0.1, 10, (n, 1))
    return Problem(tuple(f"l{i}" for i in range(n)), tuple(f"w{b}a8" for b in bits), scores,
                   {"avg-bits": (params[:, None] * bits).astype(float),
                    "bitops": (macs[:, None] * bits * 8).astype(float)},
                   {"avg-bits": 4.3 * params.sum(), "bitops": 0.5 * (macs * 64).sum()})


TIMED = ("ilp", "ilp-scip", "ilp-cpsat", "greedy")  # ilp: the Lagrangian branch and bound, SCIP behind it


def ilp_timing() -> list[list]:
    """Each method on the same problem in one process, three runs each, interleaved (so a busy machine
    slows them alike): [method, solver, median seconds, the median run's status (every run's when they
    differ), its objective]."""
    from onnxmpq.allocate import solve

    problem = timing_problem()
    runs: dict[str, list] = {m: [] for m in TIMED}
    for _ in range(3):
        for method in TIMED:
            start = time.perf_counter()
            alloc = solve(problem, method, 10.0)
            runs[method].append((time.perf_counter() - start, alloc))
    rows = []
    for method in TIMED:
        secs, alloc = sorted(runs[method], key=lambda run: run[0])[1]
        statuses = [a.status for _, a in runs[method]]
        status = alloc.status if len(set(statuses)) == 1 else f"{alloc.status} (runs: {', '.join(statuses)})"
        rows.append([method, alloc.solver, f"{secs:.2f}", status, f"{alloc.objective:.4f}"])
    return rows


def solver_time() -> list[str]:
    """The solver-time section (also `python -m benchmarks.allocation --solvers` alone)."""
    return ["### Solver time: 500 layers x 6 candidates, avg-bits and BitOps budgets (median of 3)\n",
            common.table(["method", "solver", "seconds", "status", "objective"], ilp_timing()), ""]


def pareto(tmp: Path) -> str:
    from onnxmpq.pipeline import api, config

    out = tmp / "sweep.onnx"
    frontier = api.run(config.build(str(common.MODELS["resnet20"]), {
        "output.path": str(out), "data.calib": str(common.CALIB), "sweep.spec": "avg-bits=2:8:0.5",
        "search.cache_dir": str(CACHE / "cache_resnet20"), "precision.rounding": "nearest"}))
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / "pareto_resnet20.png"
    target.write_bytes(Path(frontier["plot"]).read_bytes())
    rows = [[p["value"], round(p["avg_weight_bits"], 3), p["weight_bytes"], round(p["drop"], 4), round(p["kl"], 4),
             "yes" if i in frontier["frontier"] else ""] for i, p in enumerate(frontier["points"]) if "error" not in p]
    return common.table(["avg-bits budget", "achieved", "weight bytes", "drop (held-out agreement)", "KL", "frontier"],
                        rows)


def run(ctx: common.Context) -> str:
    parts = ["## Allocation (issue 5)\n"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        head = ["model", "allocation", "metric", "rounding", "avg W bits", "top-1", "weight bytes", "BitOps", "s"]
        rows20, base20 = cifar_rows(ctx, "resnet20", ("kl", "sqnr", "mutual-info"),
                                    ("ilp", "greedy", "threshold", "eagl"), tmp)
        x, _ = ctx.cifar_test()
        parts += [f"### ResNet-20, {len(x):,d} CIFAR-10 test images (float top-1 {base20:.4f}); activations 8 bits; "
                  "calibration 256 images, no labels; search time includes the sensitivity sweep when not cached\n",
                  common.table(head, rows20), ""]
        _partial(parts)
        rows56, base56 = cifar_rows(ctx, "resnet56", ("kl",), ("ilp", "greedy"), tmp, gptq_bits=(),
                                    bits_list=(3, 4), gptq_uniform=())
        parts += [f"### ResNet-56 (float top-1 {base56:.4f})\n", common.table(head, rows56), ""]
        _partial(parts)
        rows_ocr, cer = ocr_rows(ctx, tmp)
        parts += [f"### PP-OCRv4 recognition, {len(ctx.ocr_sets()[1])} rendered lines (float CER {100 * cer:.2f}%); "
                  "calibration 16 lines; candidates W4/5/6/8 x A8/A16\n",
                  common.table(["allocation", "metric", "rounding", "avg W bits", "CER %", "exact %", "weight bytes",
                                "BitOps", "s"], rows_ocr), ""]
        _partial(parts)
        parts += ["### Pareto frontier, ResNet-20 (nearest rounding, kl, ilp; drop = 1 - top-1 agreement with float "
                  "on the 256 calibration samples, the set holding no more)\n", pareto(tmp), "",
                  "![ResNet-20 Pareto frontier](benchmarks/results/pareto_resnet20.png)\n"]
    parts += solver_time()
    return "\n".join(parts)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--solvers"]:
        raise SystemExit("usage: python -m benchmarks.allocation --solvers  (the rest runs from benchmarks.run)")
    print("\n".join(solver_time()))
