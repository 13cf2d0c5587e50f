"""The README's first command from a fresh clone with nothing beside it (slow: it builds its own venv).

The clone goes to a temporary folder, so no `../shared` (or any other sibling) is in reach; `make
quickstart` must set up, quantize and evaluate from the repository's own files alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git and a checkout")
def test_quickstart_from_a_fresh_clone(tmp_path):
    clone = tmp_path / "onnxmpq"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert not (tmp_path / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run(["make", "quickstart"], cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {m.group(1): float(m.group(2)) for m in
            re.finditer(r"^(resnet20_\w+)\.onnx\s+[\d,]+\s+[\d,]+\s+[\d.]+\s+([\d.]+)", done.stdout, re.M)}
    assert set(rows) == {"resnet20_cifar10", "resnet20_w8a8", "resnet20_w4a8"}, done.stdout[-2000:]
    assert rows["resnet20_cifar10"] > 0.75
    assert rows["resnet20_w8a8"] > rows["resnet20_cifar10"] - 0.02
    float_size = (clone / "models" / "resnet20_cifar10.onnx").stat().st_size
    assert (clone / "build" / "resnet20_w4a8.onnx").stat().st_size < float_size / 4
