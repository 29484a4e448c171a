# Two commands on a fresh machine:  `make demo` (main job)  and  `make test` (test suite).
# Both create .venv, put torch in place first (2.13.0 CPU from the local file when no torch is
# present, so pip never pulls the CUDA build), then install mtprl with its extras.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
TORCH  ?= torch==2.13.0
STAMP   = $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

# verl 0.9.1 pins transformers<5.11 but runs with ours for what mtprl uses (docs/integrations.md): it is
# installed last and without its dependencies, so pip neither downgrades transformers nor reports the pin as
# an ERROR (a --no-deps install skips pip's conflict check).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,trl]"
	$(PIP) install -q "ray>=2.41" "tensordict>=0.8,<=0.10.0,!=0.9.0" omegaconf codetiming orjson
	$(PIP) install -q --no-deps "verl==0.9.1"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mtprl demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)  # the suite without the tests marked slow (multi-process launches, long runs)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
