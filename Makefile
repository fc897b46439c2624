# Each target creates its own virtual environment in .venv (override with VENV=...).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.evoprune-installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# Build the offline reference model (cached), search 8 generations of the example
# study, print its best trials, export the best one as an HF checkpoint and write
# the HTML report (its path is the last line).
demo: $(STAMP)
	$(VENV)/bin/evoprune reference-model --size small
	mkdir -p out
	$(VENV)/bin/evoprune search studies/reference_small.yaml --storage sqlite:///out/demo.db --study demo --generations 8 --progress
	$(VENV)/bin/evoprune show --storage sqlite:///out/demo.db --study demo
	rm -rf out/demo-best
	$(VENV)/bin/evoprune export --storage sqlite:///out/demo.db --study demo --trial best --out out/demo-best
	$(VENV)/bin/evoprune report --storage sqlite:///out/demo.db --study demo --out out/demo-report.html

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
