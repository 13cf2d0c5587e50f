"""Issue 13 (3): onnxmpq against AIMET-ONNX's automatic mixed precision, side by side in one run.

AIMET's `choose_mixed_precision` (aimet-onnx 2.42.0; Pandey et al. 2023) with candidates W8A8 and W4A8,
phase 1 its SQNR callback on 128 calibration images, phase 2 a binary search with a labelled top-1
callback, allowed drop 1 point; onnxmpq's `quantize --bits 4,8 -a 8` with `--max-drop 0.01` (greedy and
ILP) and with `--budget bitops=` set to AIMET's result. Both run on the bundled ResNet-20/56, calibrate
on calibration/cifar10_train256.npz, and every final model is scored on the same bundled test images.

AIMET is no dependency of the project: it runs in its own interpreter (`AIMET_PYTHON`, default
/tmp/venv-aimet/bin/python, set up from benchmarks/requirements-aimet.txt) on benchmarks/aimet_amp.py.
Each tool is timed as one subprocess, wall clock from start to exit, imports and sensitivity included.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from onnxmpq import calibrate
from onnxmpq.graph import model as graph
from onnxmpq.sensitivity import FAST_BY_DEFAULT

AIMET_PYTHON = Path(os.environ.get("AIMET_PYTHON", "/tmp/venv-aimet/bin/python"))
RUNNER = common.ROOT / "benchmarks" / "aimet_amp.py"
IMAGES = common.ROOT / "data" / "cifar10-test"
JUDGE_EVERY = 4  # every 4th bundled image (50 a class) is AIMET's phase-2 set; the other 1,500 score
REPEAT = {"resnet20": 3, "resnet56": 1}  # runs per configuration (ResNet-56 once: its runs take minutes)
MODELS = ("resnet20", "resnet56")
QUANTIZE = ["--bits", "4,8", "-a", "8"]


def split() -> dict[str, np.ndarray]:
    """The 2,000 bundled test images: 500 for AIMET's accuracy callback, 1,500 to score every model."""
    source = calibrate.read(IMAGES, graph.load(common.MODELS["resnet20"]))
    xs, ys = zip(*[(b.inputs["input"], b.labels) for b in source.batches(500)])
    x, y = np.concatenate(xs), np.concatenate(ys)
    judge = np.arange(len(x)) % JUDGE_EVERY == 0
    return {"judge_x": x[judge], "judge_y": y[judge], "eval_x": x[~judge], "eval_y": y[~judge]}


def timed(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, int]:
    """Runs `cmd` to exit; returns (wall seconds, exit code); stdout and stderr go to `log`."""
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    return time.perf_counter() - start, code


def run_aimet(model: Path, tmp: Path, out: Path) -> tuple[float, dict | str]:
    secs, code = timed([str(AIMET_PYTHON), str(RUNNER), str(model), "--calib", str(common.CALIB), "--judge",
                        str(tmp / "judge.npz"), "--out", str(out)], out.with_suffix(".log"))
    if code:
        return secs, f"exit {code}: " + _last_line(out.with_suffix(".log"))
    return secs, json.loads((out / "result.json").read_text())


def run_onnxmpq(model: Path, out: Path, extra: list[str]) -> tuple[float, dict | str]:
    code = "import sys; sys.argv[0] = 'onnxmpq'; from onnxmpq.cli.main import entry; sys.exit(entry())"
    cmd = [sys.executable, "-c", code, "quantize", str(model), "-o", str(out), "--calib", str(common.CALIB),
           *QUANTIZE, *extra, "--report", str(out.with_suffix(".json")), "-q"]
    env = dict(os.environ, PYTHONPATH=str(common.ROOT))
    secs, code = timed(cmd, out.with_suffix(".log"), env)
    if code:
        return secs, f"exit {code}: " + _last_line(out.with_suffix(".log"))
    report = json.loads(out.with_suffix(".json").read_text())
    layers = {e["name"]: {"weight_bits": e["weight_bits"], "act_bits": e["act_bits"]} for e in report["layers"]}
    return secs, {"layers": layers, "report_bitops": report["bitops"], "stages": report.get("stages", {}),
                  "judge": report.get("verification") or {}}


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def costs(model: Path, layers: dict) -> tuple[float, float]:
    """(average weight bits, BitOps per image) of per-layer bits under one cost model for both tools:
    avg = sum(params * w) / sum(params); BitOps = sum(MACs * w * a) over Conv/Gemm (float = 32 bits)."""
    specs = graph.load(model).layers
    bits = [(s, layers[s.name]["weight_bits"] or 32, layers[s.name]["act_bits"] or 32) for s in specs]
    avg = sum(s.params * w for s, w, _ in bits) / sum(s.params for s, _, _ in bits)
    return avg, float(sum(s.macs * w * a for s, w, a in bits))


def onnxmpq_configs(aimet_relative: float | None) -> list[tuple[str, list[str]]]:
    """onnxmpq's runs: the accuracy-drop form (as AIMET's), then the BitOps AIMET reached as a budget."""
    configs = [(f"onnxmpq {m} --max-drop 0.01", ["--max-drop", "0.01", "--method", m]) for m in ("greedy", "ilp")]
    if aimet_relative is not None:
        budget = ["--budget", f"bitops={aimet_relative:.4f}x"]
        configs += [(f"onnxmpq {m} --budget bitops=AIMET's", budget + ["--method", m]) for m in ("greedy", "ilp")]
        other = "exact" if FAST_BY_DEFAULT else "fast"
        configs.append((f"onnxmpq ilp --budget bitops=AIMET's --probes {other}",
                        budget + ["--method", "ilp", "--probes", other]))
        configs.append(("onnxmpq ilp --budget bitops=AIMET's --probe-rounding auto (GPTQ probes, as before)",
                        budget + ["--method", "ilp", "--probe-rounding", "auto"]))
        configs.append(("onnxmpq ilp --budget bitops=AIMET's --rounding nearest",
                        budget + ["--method", "ilp", "--rounding", "nearest"]))
    return configs


def measure_model(name: str, data: dict, tmp: Path, repeat: int) -> tuple[list[dict], float]:
    """Every configuration `repeat` times, interleaved: each round runs AIMET first (the budget rows need
    its result), then every onnxmpq row; one more AIMET run closes the model, so AIMET's median brackets
    the onnxmpq runs in time. Returns one record per configuration and the float top-1."""
    model = common.MODELS[name]
    score = lambda path: common.classify(path, data["eval_x"], data["eval_y"])["top1"]  # noqa: E731
    records: dict[str, dict] = {}
    relative = None

    def add(label: str, path: Path, timed_run, **extra) -> dict:
        load = os.getloadavg()[0]
        secs, result = timed_run()
        rec = records.setdefault(label, {"label": label, "times": [], "loads": [], "result": result, "path": path,
                                         "same": True, **extra})
        rec["times"].append(secs)
        rec["loads"].append(load)
        rec["same"] &= _layers(result) == _layers(rec["result"])
        print(f"{name} {label} run {len(rec['times'])}: {secs:.1f} s (load {load:.1f})", flush=True)
        return rec

    for rnd in range(repeat + 1):
        out = tmp / f"{name}_aimet_{rnd}"
        rec = add("AIMET AMP", out / "model.onnx", lambda out=out: run_aimet(model, tmp, out))
        if rnd == repeat:
            break
        if rnd == 0 and isinstance(rec["result"], dict):
            w8a8 = {s.name: {"weight_bits": 8, "act_bits": 8} for s in graph.load(model).layers}
            relative = costs(model, rec["result"]["layers"])[1] / costs(model, w8a8)[1]
        for i, (label, extra) in enumerate(onnxmpq_configs(relative)):
            path = tmp / f"{name}_omq{i}_{rnd}.onnx"
            add(label, path, lambda path=path, extra=extra: run_onnxmpq(model, path, extra), args=extra)
    for rec in records.values():
        rec["time"] = statistics.median(rec["times"])
        if isinstance(rec["result"], dict):
            rec["top1"] = score(rec["path"])
            rec["avg_bits"], rec["bitops"] = costs(model, rec["result"]["layers"])
    return list(records.values()), score(model)


def _layers(result) -> object:
    return result["layers"] if isinstance(result, dict) else result


def versions() -> str:
    code = ("import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
            "('aimet-onnx', 'torch', 'onnxruntime', 'onnx')))")
    return subprocess.run([str(AIMET_PYTHON), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def run(ctx) -> str:
    """The section: measures both models, keeps the raw records in build/bench/aimet_raw.json, renders."""
    if not AIMET_PYTHON.exists():  # raise rather than overwrite the measured section with nothing
        raise SystemExit(f"no AIMET interpreter at {AIMET_PYTHON}: run `make bench-aimet`, which makes its venv "
                         "from benchmarks/requirements-aimet.txt, or point AIMET_PYTHON at one.")
    raw = {"versions": versions(), "load_before": os.getloadavg(), "models": {}}
    data = split()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        np.savez(tmp / "judge.npz", input=data["judge_x"], labels=data["judge_y"])
        for name in MODELS:
            repeat = 1 if ctx.quick else REPEAT.get(name, 1)
            records, base = measure_model(name, data, tmp, repeat)
            aimet = records[0]
            if isinstance(aimet["result"], dict):  # the exported QDQ against AIMET's own sim, on its 500 images
                aimet["judge_top1_qdq"] = common.classify(aimet["path"], data["judge_x"], data["judge_y"])["top1"]
            for rec in records:
                rec["path"] = str(rec["path"])
            raw["models"][name] = {"float_top1": base, "repeat": repeat, "records": records}
    raw["load_after"] = os.getloadavg()
    common.CACHE.mkdir(parents=True, exist_ok=True)
    (common.CACHE / "aimet_raw.json").write_text(json.dumps(raw, indent=1))
    return render(raw)


METHOD = """Both tools quantize the bundled CIFAR-10 ResNets ({models}) with weight candidates 4 and 8 bits and
8-bit activations, calibrating on `calibration/cifar10_train256.npz` (256 training images). The 2,000
bundled test images (`data/cifar10-test`) are split: every 4th (500, 50 a class) is AIMET's phase-2
accuracy callback, and **top-1 of every model is on the other 1,500**, in this project's onnxruntime
(standard error of one top-1 about 1.0 point; two models on the same images differ by less noise).

- **AIMET AMP**: aimet-onnx `choose_mixed_precision` in its own venv (`benchmarks/requirements-aimet.txt`;
  {versions}), run by `benchmarks/aimet_amp.py`: QuantSim with AIMET's
  per-channel default config (symmetric per-channel weights, min-max ranges, nearest rounding),
  candidates W8A8 and W4A8, phase 1 AIMET's SQNR callback on 128 calibration images, phase 2 binary search
  with top-1 on the 500 labelled images, allowed drop 0.01; the final sim exported with `to_onnx_qdq`.
- **onnxmpq**: `onnxmpq quantize MODEL -o OUT --calib calibration/cifar10_train256.npz --bits 4,8 -a 8`
  plus the flags in the row, defaults otherwise (GPTQ rounding for the 4-bit layers, MSE activation
  ranges, Q/DQ on the whole graph). `--max-drop 0.01` judges label-free top-1 agreement with the float
  model on held-out calibration images (51 of the 256); `--budget bitops=AIMET's` is AIMET's BitOps from
  the same run, relative to W8A8.
- **Wall s**: one subprocess per tool run, start to exit (interpreter start, imports, calibration,
  sensitivity, search, writing); no cache. Rounds per model: {repeat_text} Each round runs AIMET, then
  each onnxmpq row; one more AIMET run closes the model, so AIMET's median brackets the onnxmpq runs. One
  2-core machine shared with other jobs (load average {load_before} at the start, {load_after} at the end;
  the 1-minute load before each run is in the notes): the same command took up to 4x longer in one round
  than in another, so the cell gives the median and (min-max) over the runs.
- **Not like for like**: AIMET's phase 2 sees 500 labelled test images, drawn like the 1,500 scored;
  onnxmpq sees only the 256 unlabelled training images. AIMET's drop is labelled top-1 against float on
  its 500 (a W8A8 model that fixes as many predictions as it breaks drops 0); onnxmpq's is the share of
  the 51 held-out predictions that change, so one change is 0.0196 and `--max-drop 0.01` asks for none.
  onnxmpq rounds 4-bit weights with GPTQ by default and AIMET to nearest: the `--rounding nearest` row
  takes AIMET's rounding.
- **avg W bits, BitOps**: one cost model for both, from the model's Conv/Gemm layers: avg = sum(params *
  w) / sum(params), BitOps = sum(MACs * w * a) per image.
- **Targets** (issue 13): onnxmpq at most 0.25x AIMET's wall time and at least AIMET's top-1; the last
  column says yes/no for each.
"""


READING = (
    "Reading (the run above, 2026-12-04, on main 9f66e81, a quiet machine: load about 2, our own two "
    "processes): on ResNet-20 onnxmpq's defaults meet both targets, at AIMET's BitOps the ILP in 0.24x "
    "AIMET's time (6.3 s against 26.3 s) at 0.8187 top-1 against 0.8087 and greedy in 0.23x at 0.8127; "
    "the exact probes take 0.25x (6.6 s, just over) at 0.8093, the GPTQ-rounded probes of before 0.45x. "
    "On ResNet-56 AIMET exits early with W4A8 everywhere; that budget admits one allocation, so onnxmpq "
    "measures no sensitivity and its time is GPTQ's rounding of 56 layers (9.9 of 12.0 s, 0.53x, top-1 "
    "0.8320 against 0.8273); with AIMET's own nearest rounding onnxmpq meets both targets there (2.3 s, "
    "0.10x, 0.8353), and on ResNet-20 it is fast but 1.5 points below AIMET (0.7940). `--max-drop 0.01`, "
    "the form of AIMET's stopping rule, cannot be met by onnxmpq's judge (agreement on 51 held-out "
    "calibration images, where W8A8 everywhere already changes one prediction, 0.0196); it says so in 1-2 s, "
    "before the sweep. Before issue 13's work (the run of d6abac5 on the same kind of machine) the same "
    "rows took 14.5 s (0.54x) on ResNet-20 and 59.1 s (2.5x) on ResNet-56."
)


def _load(values) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def render(raw: dict) -> str:
    """The section's markdown from the raw records of `run`."""
    repeats = {name: m["repeat"] for name, m in raw["models"].items()}
    repeat_text = "; ".join(f"{name}: {r}" for name, r in repeats.items())
    parts = ["## onnxmpq against AIMET-ONNX AMP (issue 13)",
             METHOD.format(models=", ".join(raw["models"]), versions=raw["versions"], repeat_text=repeat_text + ".",
                           load_before=_load(raw["load_before"]), load_after=_load(raw["load_after"]))]
    for name, m in raw["models"].items():
        parts += [f"### {name} (float top-1 {m['float_top1']:.4f} on the 1,500 images)", _model_table(name, m),
                  _model_notes(m)]
    parts.append(READING)
    return "\n\n".join(parts) + "\n"


def _model_table(name: str, m: dict) -> str:
    recs = m["records"]
    aimet = recs[0]
    rows = [[name, "float", "-", round(m["float_top1"], 4), 32.0, "-", "-", "-"]]
    for rec in recs:
        ok = "top1" in rec
        ratio = rec["time"] / aimet["time"]
        times = rec["times"]
        wall = f"{rec['time']:.1f}" + (f" ({min(times):.1f}-{max(times):.1f})" if len(times) > 1 else "")
        if rec is aimet or not ok or "top1" not in aimet:
            targets = "-"
        else:
            targets = f"{'yes' if ratio <= 0.25 else 'no'} / {'yes' if rec['top1'] >= aimet['top1'] else 'no'}"
        rows.append([name, rec["label"], wall, round(rec["top1"], 4) if ok else "failed (below)",
                     round(rec["avg_bits"], 3) if ok else "-", f"{rec['bitops']:.3g}" if ok else "-",
                     f"{ratio:.2f}x", targets])
    return common.table(["model", "tool / method", "wall s", "top-1", "avg W bits", "BitOps", "time / AIMET",
                         "targets: <=0.25x time / >= AIMET top-1"], rows)


def _model_notes(m: dict) -> str:
    aimet = m["records"][0]
    both = [r["label"] for r in m["records"][1:] if "top1" in r and "top1" in aimet
            and r["time"] <= 0.25 * aimet["time"] and r["top1"] >= aimet["top1"]]
    notes = [f"- Both targets met by: {', '.join(both) if both else 'no onnxmpq row'}."]
    for rec in m["records"]:
        result = rec["result"]
        if len(rec["times"]) > 1:
            runs = ", ".join(f"{t:.1f} s (load {l:.1f})" for t, l in zip(rec["times"], rec.get("loads", [])))
            notes.append(f"- {rec['label']}: runs in order {runs}.")
        if not isinstance(result, dict):
            notes.append(f"- {rec['label']} failed ({'every run' if rec.get('same', True) else 'first run'}): "
                         f"`{result}`")
            continue
        if not rec.get("same", True):
            notes.append(f"- {rec['label']}: the repeats chose different bits; the row scores the first.")
        if rec["label"] == "AIMET AMP":
            s = result["seconds"]
            notes.append(f"- AIMET AMP, first run ({rec['times'][0]:.1f} s wall): importing aimet_onnx/torch "
                         f"{s['import']:.1f} s, QuantSim and encodings {s['sim+encodings']:.1f} s, choose_mixed_precision "
                         f"{s['amp']:.1f} s. Its 500-image callback: top-1 {result['judge_top1_sim']:.3f} in AIMET's sim, "
                         f"{rec.get('judge_top1_qdq', float('nan')):.3f} for the exported QDQ in onnxruntime; "
                         f"{_pareto(result)}.")
        elif result.get("stages"):
            stages = ", ".join(f"{k} {v:.1f}" for k, v in result["stages"].items() if v >= 0.05)
            judge = result.get("judge") or {}
            drop = f"; drop in agreement on its {judge['samples']} held-out images {judge['drop']:.4f}" if judge else ""
            notes.append(f"- {rec['label']}, first run ({rec['times'][0]:.1f} s wall): stages (s) {stages}{drop}.")
    return "\n".join(notes)


def _pareto(result: dict) -> str:
    if result["pareto_points"]:
        return f"phase 2 evaluated {result['pareto_points']} points of its list"
    widths = sorted({e["weight_bits"] for e in result["layers"].values()})
    return f"no phase 1 or 2: an early exit with weights at {widths} bits everywhere"
