# Every target works on a fresh machine by itself: it creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test soak bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[worker,embedded,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m app.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

# Minutes of random kill -9, Redis restarts and S3 faults over a stream of jobs (tests/test_faults.py).
# IDFORGE_SOAK_SECONDS (default 300) sets how long; IDFORGE_SOAK_SEED picks the run.
soak: $(STAMP)
	$(BIN)/python -m pytest -q -rs -s -m soak

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .idforge .pytest_cache
