# `make test` and `make demo` work on a fresh clone: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU wheel this machine has on disk; any other spec pulls gigabytes of CUDA packages.
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install system-packages lint test bench demo demo-assets clean docs/configuration.md

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[pipeline,test,corpus,train]'
	touch $@

install: $(VENV)/.installed system-packages

# espeak-ng and sox (`s2t corpus`, tests/test_corpus.py) come from apt when missing, if there is apt and we are root;
# otherwise the tests that need them are skipped.
system-packages:
	@command -v espeak-ng >/dev/null && command -v sox >/dev/null || \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	   apt-get update -qq && apt-get install -y -qq espeak-ng sox >/dev/null) || true

# ruff: the linter (pyproject.toml's [tool.ruff]) and the formatter; `ruff format .` fixes what the check finds.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/s2t bench model

# The bundled demo data, s2t_model/assets/demo-corpus (50 utterances, <= 3 MB) and long-form (two recordings of
# 1-2.5 min), rebuilt byte for byte (same espeak-ng and libsndfile) in a temporary folder, then copied over.
# Neither says any number of the demo model's training corpus (`s2t corpus spoken-numbers --seed 1 --count 24000`):
# its numbers are drawn here without making its audio (the same as its manifest's `numbers`); or pass
# TRAIN_CORPUS=DIR to read them from the corpus. WORKERS=1 keeps `s2t corpus` to one process.
ASSETS := s2t_model/assets
S2T := $(VENV)/bin/s2t
DEMO_TRAIN_SEED := 1
DEMO_TRAIN_COUNT := 24000
demo-assets: install
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) -c 'from demo.corpus import Utterance; print("\n".join(" ".join(map(str, Utterance.draw($(DEMO_TRAIN_SEED), i).numbers)) for i in range($(DEMO_TRAIN_COUNT))))' > $$tmp/train-numbers.txt; \
	exclude=$(or $(TRAIN_CORPUS),$$tmp/train-numbers.txt); \
	$(S2T) corpus spoken-numbers --seed 3 --count 300 --exclude-numbers $$exclude --out $$tmp/demo-source $(if $(WORKERS),--workers $(WORKERS)); \
	$(S2T) corpus subset --from $$tmp/demo-source --out $$tmp/demo-corpus --count 50 --multi 5 --max-mb 3; \
	$(S2T) corpus spoken-numbers --seed 4 --count 100 --exclude-numbers $$exclude --out $$tmp/long-source $(if $(WORKERS),--workers $(WORKERS)); \
	$(S2T) corpus long-form --from $$tmp/long-source --out $$tmp/long-form --count 2 --min-seconds 60 --max-seconds 150 --seed 4; \
	mkdir -p $(ASSETS); rm -rf $(ASSETS)/demo-corpus $(ASSETS)/long-form; \
	cp -r $$tmp/demo-corpus $$tmp/long-form $(ASSETS)/; \
	du -sh $(ASSETS)/demo-corpus $(ASSETS)/long-form

# The main job on the bundled demo corpus with the bundled model, on a local Ray, offline: Parquet under out/demo.
demo: $(VENV)/.installed
	rm -rf out/demo
	$(S2T) transcribe $(ASSETS)/demo-corpus/manifest.jsonl out/demo --model $(ASSETS)/demo-model --show 5

clean:
	rm -rf $(VENV) out .pytest_cache

# The Serve config for `serve deploy` and the RayService, from `s2t serve`'s own options (see its first lines).
infra/serve.yaml: $(VENV)/.installed pipeline/serve.py jobs/serve.py
	{ sed -n 1,3p $@; $(S2T) $$(sed -n 2p $@ | sed 's/^#   s2t //'); } > $@.new && mv $@.new $@
	$(PY) infra/render.py  # the RayService's serveConfigV2 is this file

# Every option of the jobs, from their typed configs (tests/test_docs.py checks the page is up to date).
docs/configuration.md: $(VENV)/.installed
	$(PY) -m jobs.configuration_page > $@
