# The README's commands: `make up` installs and starts the system on embedded
# defaults; `make test` runs the tests. Everything installs into .venv/ (Python)
# and .tools/ (buf from npm).

PYTHON ?= python3
# bash with pipefail: a failed pip install fails the step even though its output is filtered
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
BIN := $(VENV)/bin
BUF := .tools/node_modules/.bin/buf

.PHONY: up serve test install tools browser screenshots gen check-generated lint bench clean

up: install
	$(BIN)/a67 up

serve: install
	$(BIN)/a67 serve

test: install
	$(BIN)/pytest -q

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "==> [1/3] creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> [2/3] upgrading pip"
	$(BIN)/pip install -q --upgrade pip
	@echo "==> [3/3] installing the controller and its dependencies (about 30 s the first time; each package is listed)"
	$(BIN)/pip install --progress-bar off -e '.[dev]' 2>&1 | tee $(VENV)/install.log \
	  | { grep --line-buffered -E '^(Collecting|Successfully installed|ERROR)' || true; } | cut -c1-120
	touch $@
	@echo "==> installed (full log: $(VENV)/install.log)"

tools: $(BUF)

# The dashboard's browser tests (tests/browser/) need Debian's Chromium and its
# ChromeDriver; `make up` does not. Without them the tests skip, except under CI.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "==> chromium: $$(/usr/bin/chromium --version)"; \
	else apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; fi

# Regenerate the dashboard's screenshots: the browser tests write them all to
# tests/browser/screenshots/ (ignored by git); docs/dashboard.md shows a few, copied here.
DOC_SHOTS := signin register-field-violation signin-mfa nodes-enroll nodes-live node-detail nodes-phone \
  nodes-failed alerts-mass-failure deployment-new-violations deployment-running deployment-running-phone \
  deployment-rollout deployment-logs database-schema-query metrics files
screenshots: install browser
	$(BIN)/pytest -q tests/browser
	mkdir -p docs/dashboard
	for shot in $(DOC_SHOTS); do cp tests/browser/screenshots/$$shot.png docs/dashboard/; done

$(BUF):
	npm install --silent --no-save --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0

gen: install
	$(BIN)/python scripts/gen_protos.py
	$(BIN)/python scripts/gen_openapi.py

# Regenerate and fail if anything committed differs.
check-generated: gen
	git diff --exit-code -- generated third_party docs/openapi.json
	@test -z "$$(git status --porcelain -- generated third_party docs/openapi.json)" || (git status --porcelain -- generated third_party docs/openapi.json; echo "untracked generated files"; exit 1)

lint: install tools
	$(BUF) lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy controller

clean:
	rm -rf $(VENV) .tools
