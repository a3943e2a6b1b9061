# The README's commands. Each creates .venv when it is missing and installs the course into it.
#   make course   execute every lecture notebook into build/ (open build/index.html)
#   make test     run the whole test suite
#   make lab      open the course in JupyterLab
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install when the package's requirements change.
STAMP  := $(VENV)/.installed-dev

.PHONY: course test lab bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

$(VENV)/.installed-lab: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,lab]"
	touch $@

# The browser tests (tests/test_browser.py) run when Chromium is on the PATH; Playwright is then
# installed into .venv (the `browser` extra). Without Chromium they are skipped, and `make test` says so.
CHROMIUM := $(shell command -v chromium || command -v chromium-browser)

$(VENV)/.installed-browser: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,browser]"
	touch $@

course: $(STAMP)
	$(BIN)/lecturekit course $(if $(FAST),--fast)

test: $(STAMP) $(if $(CHROMIUM),$(VENV)/.installed-browser)
	@if [ -n "$(CHROMIUM)" ]; then echo "browser tests: on (Chromium at $(CHROMIUM))"; \
	else echo "browser tests: SKIPPED, no Chromium on the PATH (apt-get install chromium); everything else runs"; fi
	LECTUREKIT_STANDIN=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lab: $(VENV)/.installed-lab
	$(BIN)/lecturekit lab

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(if $(FAST),--fast) $(BENCH_ARGS)

clean:
	rm -rf build .pytest_cache
