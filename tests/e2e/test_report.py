"""`onnxmpq quantize --report-dir`: report.json plus a self-contained report.html with embedded PNG plots,
on the bundled ResNet-20, read back with html.parser and Pillow, and rendered by headless Chromium when
it is installed.

To stay quick: nearest rounding, 32 calibration samples, candidates 3 and 5 bits (a five-point Pareto
sweep), and a calibration file of the first 96 samples of calibration/cifar10_train256.npz (64 held out).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageStat

from onnxmpq.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "resnet20_cifar10.onnx"
CALIB = ROOT / "calibration" / "cifar10_train256.npz"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "build" / "report_screenshot.png"
LAYERS = 20
VOID = {"img", "meta", "br", "hr", "input", "link", "col", "area", "base", "source", "wbr"}


class Page(HTMLParser):
    """Headings (h1/h2 text), images (src, alt, the heading above), tables (rows of cells) and the stack
    of open tags, to tell whether the page is balanced."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.h1, self.h2, self.imgs, self.tables = [], [], [], []
        self.stack, self.mismatched = [], []
        self._text, self._cell = None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in VOID:
            self.stack.append(tag)
        if tag in ("h1", "h2", "title"):
            self._text = []
        elif tag == "img":
            self.imgs.append({"src": attrs.get("src", ""), "alt": attrs.get("alt"),
                              "section": self.h2[-1] if self.h2 else None})
        elif tag == "table":
            self.tables.append({"section": self.h2[-1] if self.h2 else None, "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = [tag, []]

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.mismatched.append((tag, list(self.stack)))
        else:
            self.stack.pop()
        if tag in ("h1", "h2") and self._text is not None:
            getattr(self, tag).append("".join(self._text).strip())
            self._text = None
        elif tag == "title":
            self._text = None
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append((self._cell[0], "".join(self._cell[1]).strip()))
            self._cell = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)
        if self._cell is not None:
            self._cell[1].append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def png_of(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    try:
        data = base64.b64decode(src[len(prefix):], validate=True)
    except binascii.Error as exc:
        pytest.fail(f"image is not valid base64: {exc}")
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    Image.open(io.BytesIO(data)).verify()
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def layer_rows(page: Page) -> list[list[str]]:
    """The data rows (td cells) of the table under the "Layers" heading."""
    tables = [t for t in page.tables if t["section"] == "Layers"]
    assert len(tables) == 1
    rows = tables[0]["rows"]
    header = [text for kind, text in rows[0]]
    assert rows[0] and all(kind == "th" for kind, _ in rows[0])
    assert header[:5] == ["#", "layer", "op", "W", "A"]
    return [[text for _, text in row] for row in rows[1:]]


def drop_run_dependent(report: dict) -> dict:
    out = {k: v for k, v in report.items() if k not in ("time_s", "stages")}
    if out.get("verification"):
        out["verification"] = {k: v for k, v in out["verification"].items() if "latency" not in k}
    return out


def quantize(*args) -> dict:
    """`onnxmpq -q quantize ARGS --json` in process (stdout/stderr redirected: module fixtures cannot use
    the function-scoped capsys); returns the printed report."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["-q", "quantize", *[str(a) for a in args], "--json"])
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    np.savez(folder / "calib96.npz", input=np.load(CALIB)["input"][:96])
    return folder


@pytest.fixture(scope="module")
def budgeted(work):
    """Bits chosen under avg-bits=4 (candidates 3, 5) with --report-dir --stable-report: (folder, --json report)."""
    report = quantize(MODEL, "-o", work / "mixed.onnx", "--calib", work / "calib96.npz",
                      "--budget", "avg-bits=4", "--bits", "3,5", "--profile", "cpu-ort", "--rounding", "nearest",
                      "--limit", "32", "--cache", work / "cache", "--report-dir", work / "rep_mixed",
                      "--stable-report")
    return work / "rep_mixed", report


@pytest.fixture(scope="module")
def uniform(work):
    """W8A8 everywhere (no budget) with --report-dir and without --stable-report: (folder, --json report)."""
    report = quantize(MODEL, "-o", work / "w8a8.onnx", "--calib", work / "calib96.npz", "-w", "8",
                      "-a", "8", "--rounding", "nearest", "--limit", "32", "--report-dir", work / "rep_w8a8")
    return work / "rep_w8a8", report


# ---------------------------------------------------------------- the budgeted report


def test_report_folder_holds_json_and_html(budgeted):
    folder, _ = budgeted
    assert sorted(p.name for p in folder.iterdir()) == ["report.html", "report.json"]


def test_html_has_the_sections_and_balanced_tags(budgeted):
    folder, report = budgeted
    text = (folder / "report.html").read_text(encoding="utf-8")
    page = parse(folder / "report.html")
    assert not page.mismatched, page.mismatched[:3]
    assert page.stack == []
    assert page.h1 == ["onnxmpq report: resnet20_cifar10.onnx"]
    for heading in ("Bits per layer", "Sensitivity", "Pareto", "Layers", "Units without weights", "Quantized tensors"):
        assert sum(h.startswith(heading) for h in page.h2) == 1, (heading, page.h2)
    data = json.loads((folder / "report.json").read_text())
    assert len(data["units"]) == 10 and len(data["tensors"]) == text.count("<td class='l'>graph input") + sum(
        1 for t in data["tensors"] if t["source"])
    assert data["verification"]["kernels"] == {"integer_compute": 20, "float_compute": 0}
    assert len(page.imgs) == text.count("<img") == 3
    figures = [h for h in page.h2 if h.split()[0] in ("Bits", "Sensitivity", "Pareto")]
    assert [img["section"] for img in page.imgs] == figures
    # self-contained: nothing fetched from elsewhere
    assert "<script" not in text and "<link" not in text and "http://" not in text and "https://" not in text


def test_every_image_is_an_embedded_png_pillow_opens(budgeted):
    folder, _ = budgeted
    page = parse(folder / "report.html")
    assert page.imgs
    for img in page.imgs:
        image = png_of(img["src"])
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 300 and height >= 200, (img["alt"], image.size)
        stat = ImageStat.Stat(image.convert("L"))
        assert stat.var[0] > 0, f"{img['alt']} is a blank image"
        assert img["alt"] == img["section"]


def test_layer_table_has_one_row_per_layer(budgeted):
    folder, report = budgeted
    rows = layer_rows(parse(folder / "report.html"))
    assert len(rows) == LAYERS == len(report["layers"])
    assert [row[0] for row in rows] == [str(i) for i in range(LAYERS)]
    assert [row[1] for row in rows] == [l["name"] for l in report["layers"]]
    assert [row[2] for row in rows] == [l["op_type"] for l in report["layers"]]
    assert [row[3] for row in rows] == [str(l["weight_bits"]) for l in report["layers"]]
    assert {row[3] for row in rows} == {"3", "5"}
    assert [row[4] for row in rows] == ["8"] * LAYERS


def test_report_json_is_the_json_report_without_run_dependent_fields(budgeted):
    folder, report = budgeted
    saved = json.loads((folder / "report.json").read_text())
    assert "time_s" in report and "latency_ms" in report["verification"]  # the --json report has them
    assert "time_s" not in saved and "stages" not in saved
    assert not [k for k in saved["verification"] if "latency" in k]
    assert saved == drop_run_dependent(report)


def test_html_summary_states_the_allocation(budgeted):
    folder, report = budgeted
    page = parse(folder / "report.html")
    summary = {row[0][1]: row[1][1] for row in page.tables[0]["rows"]}
    assert summary["model"] == str(MODEL)
    assert summary["budgets"] == "avg-bits=4"
    assert "profile cpu-ort" in summary["allocation"]
    assert f"avg {report['avg_weight_bits']:.2f} bits" in summary["weights"]
    assert "latency" not in summary["verified"]  # stable: no timing on the page either


# ---------------------------------------------------------------- the uniform report


def test_uniform_report_has_only_the_bits_plot(uniform):
    folder, report = uniform
    page = parse(folder / "report.html")
    assert not page.mismatched
    assert len(page.imgs) == 1
    assert page.imgs[0]["section"].startswith("Bits per layer")
    png_of(page.imgs[0]["src"])
    assert not any(h.startswith(("Sensitivity", "Pareto")) for h in page.h2)
    assert "Layers" in page.h2
    rows = layer_rows(page)
    assert len(rows) == LAYERS and {(r[3], r[4]) for r in rows} == {("8", "8")}


def test_uniform_report_json_without_stable_keeps_the_timings(uniform):
    folder, report = uniform
    saved = json.loads((folder / "report.json").read_text())
    assert "time_s" in saved and "latency_ms" in saved["verification"]
    assert saved == report
    assert saved["allocation"] is None


# ---------------------------------------------------------------- rendered by a browser


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed")
def test_headless_chromium_renders_the_report(budgeted, tmp_path):
    folder, _ = budgeted
    shot = tmp_path / "report.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,2400", (folder / "report.html").resolve().as_uri()]
    try:
        subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("chromium did not finish within 90 s")
    assert shot.is_file() and shot.stat().st_size > 0
    image = Image.open(shot)
    assert image.size == (1200, 2400)
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    assert gray.var() > 0, "blank page"
    assert (gray < 200).mean() > 0.01, "almost nothing drawn"  # text, table borders and plots
    # the three plots are drawn: many distinct colours (a text-only page has a few grays)
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 200
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)


# ---------------------------------------------------------------- bad input


def test_report_dir_under_a_file_is_one_clear_error(work, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    code = main(["-q", "quantize", str(MODEL), "-o", str(tmp_path / "m.onnx"), "--calib", str(work / "calib96.npz"),
                 "--rounding", "nearest", "--limit", "32", "--no-verify", "--report-dir", str(blocker / "rep")])
    _, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in err and err.startswith("error: ") and "afile" in err
