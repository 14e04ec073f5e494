# From a fresh clone: `make demo` or `make test`. Both set up .venv first; `make setup` alone
# does nothing when pyproject.toml and the install script have not changed since the last run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
DEMO_OUT ?= demo-output
# e.g. make demo DEMO_FLAGS=--overwrite (replace an earlier demo) or DEMO_FLAGS='--seed 1'
DEMO_FLAGS ?=

.PHONY: setup test demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.sh scripts/install_fonts.sh scripts/install_browser.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@PYTHON=$(PY) scripts/install_torch.sh
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,ocr,quant,tensorboard]'
	@scripts/install_fonts.sh
	@scripts/install_browser.sh
	@touch $(STAMP)
	@echo "setup: ready ($(VENV))"

# one pytest worker per core, one thread each: tiny models gain nothing from two threads, and two
# multi-threaded torch processes on two cores wait on each other at every small op
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n auto --dist worksteal

lint: setup
	$(VENV)/bin/ruff check src tests bench scripts

demo: setup
	$(VENV)/bin/ernie-lora demo --output $(DEMO_OUT) $(DEMO_FLAGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
