# One virtual environment for everything. torch is installed first and pinned, so pip takes the
# CPU wheel rather than resolving a range to a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test lint typecheck protos bench-transport clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/doramesh demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) scripts/typecheck.py

protos: $(VENV)/.installed
	$(PY) scripts/gen_protos.py

bench-transport: $(VENV)/.installed
	$(VENV)/bin/doramesh bench transport --json bench-transport.json

clean:
	rm -rf $(VENV) build *.egg-info
