# `make test` and `make demo` work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU wheel this machine has on disk; any other spec pulls gigabytes of CUDA packages.
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install test bench demo clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/s2t bench model

demo:
	@echo "make demo arrives with the demo model (issue: 'A demo model that really works'); see README.md" && exit 1

clean:
	rm -rf $(VENV) out .pytest_cache
