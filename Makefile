# Two commands set everything up on a fresh machine:
#   make demo   -- runs the main job on the embedded default world
#   make test   -- passes the test suite
# Both create .venv and install tbps from pyproject.toml when needed.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: install demo test bench clean
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tbps demo --quick --out runs/demo-quick

test: $(STAMP)
	$(BIN)/pytest -q

# Benchmarks print what they measure and rewrite their section of bench/RESULTS.md (slow).
bench: $(STAMP)
	for b in synth score selection dedup adapters eval_metrics; do $(BIN)/python bench/$$b.py || exit 1; done

clean:
	rm -rf runs .pytest_cache
