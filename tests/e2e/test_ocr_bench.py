"""Tests of the OCR benchmark tools (benchmarks.ocr): CTC decoding, CER, rendering and the float PP-OCRv4 model."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import ocr

CHARS = ["", "a", "b", "c", " "]


def _model():
    try:
        path = ocr.model_path()
    except FileNotFoundError:
        return None
    return path if path.is_file() else None


MODEL = _model()


def one_hot(indices: list[int], classes: int = len(CHARS)) -> np.ndarray:
    probs = np.full((len(indices), classes), 0.01, np.float32)
    probs[np.arange(len(indices)), indices] = 0.9
    return probs


def test_ctc_decode_collapses_repeats_and_drops_blanks():
    probs = np.stack([one_hot([1, 1, 0, 1, 2, 2, 0, 0, 3]), one_hot([0, 4, 4, 2, 0, 2, 0, 0, 0]),
                      one_hot([0] * 9)])
    assert ocr.ctc_decode(probs, CHARS) == ["aabc", " bb", ""]


def test_cer_and_exact_match():
    assert ocr.edit_distance("kitten", "sitting") == 3
    assert ocr.cer(["kitten"], ["sitting"]) == pytest.approx(3 / 7)
    assert ocr.cer(["abc", "xyz"], ["abc", "xy"]) == pytest.approx(1 / 5)
    assert ocr.cer(["", "ab"], ["ab", ""]) == pytest.approx(4 / 2)  # insertions count too
    assert ocr.exact_match(["abc", "xy", "q"], ["abc", "xyz", "q"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        ocr.cer(["a"], ["a", "b"])


def test_render_lines_is_deterministic():
    x1, t1 = ocr.render_lines(12, seed=5)
    x2, t2 = ocr.render_lines(12, seed=5)
    x3, t3 = ocr.render_lines(12, seed=6)
    assert x1.shape == (12, 3, 48, 320) and x1.dtype == np.float32
    assert np.array_equal(x1, x2) and t1 == t2
    assert t1 != t3
    assert x1.min() >= -1.0 and x1.max() <= 1.0
    assert all(4 <= len(t) <= 16 for t in t1)
    assert ocr.render_lines(2, seed=5, width=200)[0].shape == (2, 3, 48, 200)


@pytest.mark.skipif(MODEL is None, reason="PP-OCRv4 recogniser (rapidocr-onnxruntime) not installed")
def test_charset_matches_model_output():
    chars = ocr.charset(MODEL)
    assert chars[0] == "" and chars[-1] == " " and len(chars) == 6625
    assert set("0123456789abcXYZ.,:-/()%") <= set(chars)
    assert ocr.charset(MODEL.read_bytes()) == chars


@pytest.mark.skipif(MODEL is None, reason="PP-OCRv4 recogniser (rapidocr-onnxruntime) not installed")
def test_float_model_reads_rendered_lines():
    x, texts = ocr.render_lines(20, seed=3)
    result = ocr.score(MODEL, x, texts, batch_size=10)
    assert result["samples"] == 20
    assert result["cer"] < 0.05
    assert result["exact"] >= 0.8
