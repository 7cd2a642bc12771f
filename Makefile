# Every target works on a fresh machine by itself: it creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install lock demo test soak bench clean

# The locked install: every package at the version constraints.txt pins (refresh it with `make lock`).
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt pip
	$(BIN)/pip install -q -c constraints.txt -e '.[worker,embedded,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m app.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

# Minutes of random kill -9, Redis restarts and S3 faults over a stream of jobs (tests/integration/test_faults.py).
# IDFORGE_SOAK_SECONDS (default 300) sets how long; IDFORGE_SOAK_SEED picks the run.
soak: $(STAMP)
	$(BIN)/python -m pytest -q -rs -s -m soak

bench: $(STAMP)
	$(BIN)/python -m bench

# Re-resolve pyproject.toml from scratch in a throwaway venv and rewrite constraints.txt (keeping its
# header). torch's local label (+cpu) is dropped so that CPU and CUDA builds both meet the pin.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q -e '.[worker,embedded,dev]'
	awk '/^[^#]/ {exit} {print}' constraints.txt > .lock-venv/header.txt
	{ cat .lock-venv/header.txt; .lock-venv/bin/pip freeze --all --exclude-editable \
	  | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .idforge .pytest_cache
