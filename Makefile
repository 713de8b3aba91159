# The two commands a new user runs (see README): `make test` and `make demo`.
# Both create .venv on first use and install the project with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

install: $(STAMP)

# The test extra brings libtpu on Linux x86_64 (through jax[tpu]), so the memory-plan tests compile
# for a TPU topology on CPU; it is never used to run anything.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test,analysis]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

# The demo's assets (task files, tokenizer, SFT teacher and student) are prepared explicitly,
# then reused by the run; see examples/demo/.
demo: $(STAMP)
	$(PY) -m examples.demo.prepare
	$(PY) -m examples.demo.run

clean:
	rm -rf $(VENV) runs .pytest_cache
