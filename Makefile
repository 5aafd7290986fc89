# Everything a fresh Debian machine (as root) needs to run the demo and the tests.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
LINT_PATHS = $(wildcard src tests benchmarks scripts)
# This machine's pip config names local wheel dirs that may not exist; their warnings are noise.
QUIET_PIP = 2>&1 | { grep -v "^WARNING: Location '" || true; }
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := python3 python3-venv systemd containerd runc docker-registry skopeo systemd-container debootstrap iproute2 util-linux
APT_STAMP := $(VENV)/.apt-stamp
VENV_STAMP := $(VENV)/.venv-stamp

.PHONY: demo test lint unit bench clean peers image wheelhouse

$(APT_STAMP):
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@mkdir -p $(VENV) && touch $@

$(VENV_STAMP): pyproject.toml | $(APT_STAMP)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip $(QUIET_PIP)
	@$(BIN)/pip install -q -e '.[dev]' $(QUIET_PIP)
	@touch $@

demo: $(VENV_STAMP) $(APT_STAMP)
	$(BIN)/python -u scripts/demo.py

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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# OCI archive dist/spegel-node-image.tar from Debian packages and our wheel, without Docker.
image: $(VENV_STAMP) $(APT_STAMP)
	$(BIN)/python scripts/build_image.py

# The Ansible role's wheelhouse for ARCH nodes (x86_64 or aarch64; default: this machine's),
# for Pythons 3.9 to 3.13: ansible/wheelhouse/ARCH (docs/rollout.md).
ARCH ?= $(shell uname -m)
wheelhouse: $(VENV_STAMP)
	$(BIN)/python scripts/wheelhouse.py --arch $(ARCH)
