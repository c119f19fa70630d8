# Two targets do all the set-up on a fresh machine: `make claims` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: claims test bench lint example-report

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on these machines 2.13.0 is the local CPU build; a looser pin pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

claims: $(BIN)/.installed  ## the main job: every claim against the shipped organisms
	$(BIN)/pytest claims/

test: $(BIN)/.installed  ## the whole suite: library tests, claims, benchmarks' agreement checks
	$(BIN)/pytest tests/ claims/ benchmarks/ --benchmark-disable

bench: $(BIN)/.installed  ## speed against TransformerLens (pytest-benchmark)
	$(BIN)/pytest benchmarks/ --benchmark-columns=min,mean,max,rounds --benchmark-group-by=group

lint: $(BIN)/.installed
	$(BIN)/ruff check mechtests tests claims benchmarks conftest.py

CHECKPOINTS := --model multitask --model fixtures/checkpoints/multitask-finetune \
	--model fixtures/checkpoints/multitask-seed1

example-report: $(BIN)/.installed  ## the shipped organism, a fine-tune and another seed, one report
	rm -rf build/example-report
	$(BIN)/pytest claims/ $(CHECKPOINTS) --report-dir build/example-report || true
	rm -rf reports/example && cp -r build/example-report/run-* reports/example
