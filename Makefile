# Set-up and the two entry points: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.embseg-installed

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch only when missing, pinned: 2.13 is the local CPU wheel; unpinned pulls a CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.*"
	$(PY) -m pip install -q -e ".[dev]"
	# lvis depends on opencv-python, which needs libGL at import; swap in the headless build.
	$(PY) -m pip uninstall -q -y opencv-python || true
	$(PY) -m pip install -q --force-reinstall --no-deps opencv-python-headless
	$(PY) -c "import lvis, cv2, torch, ray, prefect, webdataset, pycocotools, numba"
	touch $(STAMP)

demo: setup
	$(PY) -m flows.pipeline

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check embseg flows tests

bench: setup
	$(VENV)/bin/embseg bench --quick

clean:
	rm -rf $(VENV) shards runs .pytest_cache
