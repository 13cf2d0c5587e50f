"""Deterministic OCR evaluation data and scoring for the PP-OCRv4 text recogniser.

Text lines are rendered with Pillow in the DejaVu fonts that ship inside matplotlib, preprocessed the way
PaddleOCR's recogniser expects (height 48, aspect kept, ``(x/255 - 0.5)/0.5``, right-padded with zeros to a
fixed width) and scored with greedy CTC decoding, character error rate and exact match.

Conventions of ``ch_PP-OCRv4_rec_infer.onnx`` (checked empirically): the output has ``len(character) + 2``
classes; index 0 is the CTC blank, 1..n the metadata ``character`` list and the last one the space that
PaddleOCR appends (two-word lines are read with their space). Channel order is BGR as in PaddleOCR (cv2
images), though on coloured text RGB and BGR gave the same CER, and the gray renderings here have three
equal channels anyway.

Run ``python -m benchmarks.ocr`` from the repository root to write ``benchmarks/data/ocr_eval.npz`` and
``benchmarks/data/ocr_calib.npz`` and print the float model's score.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import matplotlib
import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont

HEIGHT = 48
WIDTH = 320
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")
DIGITS, LOWER, UPPER, PUNCT = "23456789", "abcdefghijkmnpqrstuvwxyz", "ABCDEFGHJKLMNPQRSTUVWXYZ", ".:-/()%"
WORDS = ("apple", "river", "model", "paper", "quant", "total", "price", "north", "house", "light", "green",
         "table", "water", "label", "print", "value", "order", "index", "speed", "night", "metal", "sound",
         "cloud", "bread", "stone", "field", "train", "music", "layer", "signal", "bridge", "garden", "window",
         "market", "number", "yellow", "orange", "winter", "summer", "street", "office", "result", "sample",
         "weight", "invoice", "station", "battery", "channel", "example", "history", "product", "morning")


def model_path() -> Path:
    """Path of the PP-OCRv4 recogniser shipped in rapidocr-onnxruntime (the package itself is not imported)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("rapidocr_onnxruntime is not installed")
    return Path(spec.origin).parent / "models" / "ch_PP-OCRv4_rec_infer.onnx"


def _fonts() -> list[Path]:
    base = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [base / name for name in FONT_FILES]


def _pick(rng: np.random.Generator, chars: str, k: int) -> str:
    return "".join(rng.choice(list(chars), size=k))


def _random_text(rng: np.random.Generator) -> str:
    """A string of 4-16 characters of one of five kinds: words, numbers, codes, lower- or upper-case runs.

    Random runs avoid glyphs that no reader can tell apart out of context (0/O/o, 1/l/I) and keep one letter
    case, so that the float model's errors stay rare and quantization damage shows clearly."""
    while True:
        kind = rng.random()
        if kind < 0.3:
            words = [str(rng.choice(WORDS)) for _ in range(int(rng.integers(1, 3)))]
            case = rng.random()
            text = " ".join(words).upper() if case < 0.15 else " ".join(w.capitalize() for w in words) \
                if case < 0.45 else " ".join(words)
            if rng.random() < 0.3:
                text += str(rng.choice(list(":-/"))) + str(int(rng.integers(1, 1000)))
        elif kind < 0.5:
            d = [_pick(rng, DIGITS + "01", k) for k in (1, 2, 2, 3, 4)]
            forms = (f"{d[1]}.{d[2]}%", f"{d[1]}:{d[2]}", f"{d[4]}-{d[1]}-{d[2]}", f"({d[3]}){d[4]}",
                     f"{d[0]},{d[3]}.{d[1]}", f"{d[1]}/{d[2]}/{d[4]}")
            text = forms[int(rng.integers(len(forms)))]
        elif kind < 0.65:
            text = _pick(rng, UPPER, int(rng.integers(2, 4))) + "-" + _pick(rng, DIGITS, int(rng.integers(2, 6)))
        elif kind < 0.85:
            text = _pick(rng, LOWER + DIGITS + PUNCT, int(rng.integers(4, 17)))
        else:
            text = _pick(rng, UPPER + DIGITS + PUNCT, int(rng.integers(4, 17)))
        if 4 <= len(text) <= 16 and text.strip() == text:
            return text


def _render(text: str, font: ImageFont.FreeTypeFont, ink: int, paper: int, pad: int) -> Image.Image:
    """Draws `text` on a tight canvas (font ascent + descent high, `pad` pixels margin) in gray levels."""
    ascent, descent = font.getmetrics()
    left, _, right, _ = font.getbbox(text)
    image = Image.new("L", (right - left + 2 * pad, ascent + descent + 2 * pad), paper)
    ImageDraw.Draw(image).text((pad - left, pad), text, font=font, fill=ink)
    return image


def preprocess(image: Image.Image, width: int = WIDTH, bgr: bool = True) -> np.ndarray:
    """PaddleOCR rec preprocessing: resize to height 48 keeping aspect (at most `width`), scale to [-1, 1],
    zero-pad on the right to `width`. Returns (3, 48, width) float32, channel order BGR unless `bgr=False`."""
    image = image.convert("RGB")
    w = min(width, math.ceil(HEIGHT * image.width / image.height))
    pixels = np.asarray(image.resize((w, HEIGHT), Image.BILINEAR), dtype=np.float32)
    if bgr:
        pixels = pixels[:, :, ::-1]
    out = np.zeros((3, HEIGHT, width), np.float32)
    out[:, :, :w] = (pixels.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def render_lines(n: int, seed: int, width: int = WIDTH) -> tuple[np.ndarray, list[str]]:
    """Renders `n` random text lines (deterministic in `seed`); returns model-ready (n, 3, 48, width) float32
    images and the texts."""
    rng = np.random.default_rng(seed)
    fonts = _fonts()
    cache: dict[tuple[int, int], ImageFont.FreeTypeFont] = {}
    images = np.zeros((n, 3, HEIGHT, width), np.float32)
    texts = []
    for i in range(n):
        key = (int(rng.integers(len(fonts))), int(rng.integers(14, 37)))  # small sizes end up blurred
        text = _random_text(rng)
        while "Mono" in fonts[key[0]].name and any(c in PUNCT for c in text):
            text = _random_text(rng)  # the model reads a narrow mark in a wide mono cell as a space too
        if key not in cache:
            cache[key] = ImageFont.truetype(str(fonts[key[0]]), key[1])
        ink, paper = int(rng.integers(0, 70)), int(rng.integers(200, 256))
        pad = max(1, round(key[1] * rng.uniform(0.06, 0.16)))  # wide margins make the model read spaces
        images[i] = preprocess(_render(text, cache[key], ink, paper, pad), width)
        texts.append(text)
    return images, texts


def charset(model_path: str | Path | bytes) -> list[str]:
    """Decoding table of a PaddleOCR recogniser (a path or serialized bytes): the CTC blank "" at index 0,
    the metadata `character` list, then the space PaddleOCR appends."""
    if isinstance(model_path, bytes):
        model = onnx.load_from_string(model_path)
    else:
        model = onnx.load(str(model_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise ValueError("the model has no 'character' metadata")
    return [""] + meta["character"].split("\n") + [" "]


def ctc_decode(probs: np.ndarray, charset: list[str]) -> list[str]:
    """Greedy CTC decoding of (N, T, C) scores: argmax per step, collapse repeats, drop the blank (index 0)."""
    best = np.asarray(probs).argmax(axis=-1)
    texts = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        texts.append("".join(charset[k] for k in row[keep & (row != 0)]))
    return texts


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(preds: list[str], texts: list[str]) -> float:
    """Character error rate: total edit distance over total reference characters."""
    if len(preds) != len(texts):
        raise ValueError(f"{len(preds)} predictions for {len(texts)} texts")
    return sum(edit_distance(p, t) for p, t in zip(preds, texts)) / max(1, sum(len(t) for t in texts))


def exact_match(preds: list[str], texts: list[str]) -> float:
    """Fraction of lines read exactly."""
    if len(preds) != len(texts):
        raise ValueError(f"{len(preds)} predictions for {len(texts)} texts")
    return sum(p == t for p, t in zip(preds, texts)) / max(1, len(texts))


def predict(model: str | Path | bytes, images: np.ndarray, batch_size: int = 50,
            chars: list[str] | None = None) -> list[str]:
    """Decoded texts of `images` under `model` (path or serialized bytes) with onnxruntime's CPU provider."""
    if chars is None:
        chars = charset(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    sess = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    preds: list[str] = []
    for start in range(0, len(images), batch_size):
        probs = sess.run(None, {name: np.ascontiguousarray(images[start:start + batch_size], np.float32)})[0]
        if probs.shape[-1] != len(chars):
            raise ValueError(f"model has {probs.shape[-1]} classes, charset {len(chars)}")
        preds += ctc_decode(probs, chars)
    return preds


def score(model: str | Path | bytes, images: np.ndarray, texts: list[str], batch_size: int = 50) -> dict:
    """CER and exact match of `model` (path or serialized bytes) on `images` against `texts`; `cer_rstrip`:
    the CER with trailing spaces dropped from the predictions (the lines have none)."""
    preds = predict(model, images, batch_size)
    return {"cer": cer(preds, list(texts)), "exact": exact_match(preds, list(texts)), "samples": len(texts),
            "cer_rstrip": cer([p.rstrip() for p in preds], list(texts))}


def write_sets(out_dir: str | Path) -> tuple[Path, Path]:
    """Writes ocr_eval.npz (x, texts: 300 lines, seed 1) and ocr_calib.npz (x: 128 lines, seed 2)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, texts = render_lines(300, seed=1)
    eval_path, calib_path = out / "ocr_eval.npz", out / "ocr_calib.npz"
    np.savez_compressed(eval_path, x=x, texts=np.array(texts, dtype=str))
    np.savez_compressed(calib_path, x=render_lines(128, seed=2)[0])
    return eval_path, calib_path


if __name__ == "__main__":
    data = Path(__file__).resolve().parent / "data"
    eval_path, _ = write_sets(data)
    with np.load(eval_path) as arrays:
        x, texts = arrays["x"], [str(t) for t in arrays["texts"]]
    chars = charset(model_path())
    session = ort.InferenceSession(str(model_path()), providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    probs = np.concatenate([session.run(None, {"x": x[i:i + 50]})[0] for i in range(0, len(x), 50)])
    seconds = time.perf_counter() - start
    preds = ctc_decode(probs, chars)
    print(f"float PP-OCRv4 rec on {len(texts)} lines: CER {100 * cer(preds, texts):.2f}%, "
          f"exact match {100 * exact_match(preds, texts):.1f}%, onnxruntime {seconds:.1f} s (batches of 50)")
