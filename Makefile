# `make test` and `make demo` work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU wheel this machine has on disk; any other spec pulls gigabytes of CUDA packages.
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install system-packages test bench demo clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[test,corpus,train]'
	touch $@

install: $(VENV)/.installed system-packages

# espeak-ng and sox (`s2t corpus`, tests/test_corpus.py) come from apt when missing, if there is apt and we are root;
# otherwise the tests that need them are skipped.
system-packages:
	@command -v espeak-ng >/dev/null && command -v sox >/dev/null || \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	   apt-get update -qq && apt-get install -y -qq espeak-ng sox >/dev/null) || true

test: install
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/s2t bench model

demo:
	@echo "make demo arrives with the demo model (issue: 'A demo model that really works'); see README.md" && exit 1

clean:
	rm -rf $(VENV) out .pytest_cache
