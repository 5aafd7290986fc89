# Everything a fresh Debian machine (as root) needs to run the demo and the tests.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
LINT_PATHS = $(wildcard src tests benchmarks scripts)
# This machine's pip config names local wheel dirs that may not exist; their warnings are noise.
QUIET_PIP = 2>&1 | { grep -v "^WARNING: Location '" || true; }
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := python3 python3-venv systemd containerd runc docker-registry skopeo systemd-container debootstrap iproute2 util-linux prometheus
APT_STAMP := $(VENV)/.apt-stamp
VENV_STAMP := $(VENV)/.venv-stamp
# `make demo` gets the runtime only: its own venv with `pip install -e .` (no [dev] extras) and
# the Debian packages the sandbox node runs.
DEMO_VENV := .venv-demo
DEMO_APT_PACKAGES := python3 python3-venv containerd runc docker-registry skopeo iproute2
DEMO_STAMP := $(DEMO_VENV)/.demo-stamp
# $(call apt_install,PACKAGES): install the missing ones, quietly
apt_install = missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

.PHONY: demo demo-p2p test lint unit bench clean peers image wheelhouse

$(APT_STAMP):
	@$(call apt_install,$(APT_PACKAGES))
	@mkdir -p $(VENV) && touch $@

$(VENV_STAMP): pyproject.toml | $(APT_STAMP)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip $(QUIET_PIP)
	@$(BIN)/pip install -q -e '.[dev]' $(QUIET_PIP)
	@touch $@

$(DEMO_STAMP): pyproject.toml
	@echo "demo setup 1/3: Debian packages ($(DEMO_APT_PACKAGES))"
	@$(call apt_install,$(DEMO_APT_PACKAGES))
	@echo "demo setup 2/3: virtualenv $(DEMO_VENV)"
	@test -x $(DEMO_VENV)/bin/python || $(PY) -m venv $(DEMO_VENV)
	@echo "demo setup 3/3: pip install -e . (runtime dependencies only)"
	@$(DEMO_VENV)/bin/pip install -q --disable-pip-version-check -e . $(QUIET_PIP)
	@touch $@

demo: $(DEMO_STAMP)
	$(DEMO_VENV)/bin/python -u scripts/demo.py

# Three netns nodes sharing an image through real Spegel (needs root and `make peers`).
demo-p2p: $(VENV_STAMP) $(APT_STAMP)
	@$(PY) tests/peers/build.py
	$(BIN)/python -u scripts/demo_p2p.py

lint: $(VENV_STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

# Go test peers (containerd per line, crictl, Spegel, helm, judges) into a cache outside the repo.
peers:
	$(PY) tests/peers/build.py

test: $(VENV_STAMP) $(APT_STAMP) lint
	@# a peer that cannot be built is named here; the tests that need it then fail (never skip)
	@$(PY) tests/peers/build.py || echo "peers: not every test peer could be built (see above)"
	$(BIN)/pytest -q

bench: $(VENV_STAMP) $(APT_STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(DEMO_VENV) .pytest_cache .mypy_cache .ruff_cache

# OCI archive dist/spegel-node-image.tar from Debian packages and our wheel, without Docker.
image: $(VENV_STAMP) $(APT_STAMP)
	$(BIN)/python scripts/build_image.py

# The Ansible role's wheelhouse for ARCH nodes (x86_64 or aarch64; default: this machine's),
# for Pythons 3.9 to 3.13: ansible/wheelhouse/ARCH (docs/rollout.md).
ARCH ?= $(shell uname -m)
wheelhouse: $(VENV_STAMP)
	$(BIN)/python scripts/wheelhouse.py --arch $(ARCH)
