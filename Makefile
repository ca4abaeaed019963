# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when it is missing
# and install enginekit with every extra that works on this CPU-only machine, pinned by
# constraints.txt (torch is the CPU 2.13.0 wheel). The install is skipped while .venv is newer
# than pyproject.toml and constraints.txt.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.enginekit-installed
EXTRAS := openvino,tflite,keras,dev,bench

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip check
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m enginekit demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) artifacts .pytest_cache
