# eyehub: `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.eyehub-installed
# torch first: this pin resolves to the local CPU build here and the CUDA build on GPU hosts;
# an unpinned torch would pull several GB of CUDA packages.
TORCH_PIN := torch==2.13.0

.PHONY: install system-deps demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev,gpu]'
	touch $(STAMP)

# Debian tools the tests and benchmarks use (dciodvfy validates the synthetic DICOM and
# the scoring SR, dcm2niix is the ingest benchmark's comparison, Orthanc with its DICOMweb
# plugin is the PACS of the scoring tests, chromium drives the scoring page's test).
# Installed where we can (root + apt); tests that need them are skipped with a reason where
# they are absent, and fail instead with CI=true.
system-deps:
	@missing=""; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v dcm2niix >/dev/null || missing="$$missing dcm2niix"; \
	command -v dcmcjpeg >/dev/null || missing="$$missing dcmtk"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "warning: could not install$$missing; tests that need them will be skipped"; \
	  else echo "warning: not root or no apt-get; missing:$$missing"; fi; \
	fi

demo: install
	$(VENV)/bin/eyehub demo

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Every benchmark in bench/ (each prints its figures; none is pass/fail), with arguments
# smaller than the scripts' defaults where those take long on 2 CPU cores (a realistic
# cohort of 2 patients, one timed training step per network, 32 photographs):
# bench_<name>_ARGS go to bench/bench_<name>.py. Override on the command line, e.g.
# `make bench bench_models_ARGS="--device cuda --compile"`. A benchmark that fails does not
# stop the others; make fails at the end and names it.
BENCH_SCRIPTS := $(sort $(wildcard bench/bench_*.py))
bench_ingest_ARGS ?= --patients 2
bench_models_ARGS ?= --steps 1 --batch 4
bench_preprocess_ARGS ?= --images 32
bench_score_ARGS ?= --duration 20 --requests 20 --patients 24
bench_synth_ARGS ?= --patients 200

bench: install
	@failed=""; $(foreach script,$(BENCH_SCRIPTS),\
	  echo "== $(script) $($(basename $(notdir $(script)))_ARGS)"; \
	  $(PY) $(script) $($(basename $(notdir $(script)))_ARGS) || failed="$$failed $(script)";) \
	test -z "$$failed" || { echo "benchmarks that failed:$$failed"; exit 1; }

clean:
	rm -rf .eyehub .pytest_cache .mypy_cache .ruff_cache
